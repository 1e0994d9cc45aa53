"""Which call is running: the entry points every cut shares.

One :class:`CallTracker` per patch installs

1. a :class:`Shadow` of the model's ``generate`` (an instance attribute, removed on unpatch):
   it runs the patch's checks on the generation settings before any compute;
2. a :class:`Shadow` of the base model's ``get_image_features``. ``generate`` encodes images
   *before* the first forward and then drops the layout inputs (``image_sizes`` /
   ``image_grid_thw``) from the forward's kwargs, so this is where the next prefill's
   :class:`Encode` is recorded. Only an encode inside a forward or a ``generate`` call is armed
   for the encoder cut: a direct call from user code returns unpruned features;
3. a pre-hook on the base model (``model.model``) recording what the forward received
   (:class:`ForwardInputs`: where the image placeholders are, from ``input_ids`` or, as
   transformers finds them, from ``inputs_embeds`` rows equal to the image token's embedding),
   and a forward hook that closes it (``always_call``, so an exception closes it too).

All of it is per thread (:class:`~vlprune.hooks.state.ThreadLocal`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter
from vlprune.compat import passed_cache
from vlprune.hooks.state import PatchPart, ThreadLocal, eager_hook

LAYOUT_INPUTS = ("image_sizes", "image_grid_thw", "batch_num_images", "vision_aspect_ratio")
"""Keyword inputs that describe the images' token layouts (LLaVA-OneVision: also how many images
each prompt has, and its AnyRes downsampling rule)."""


@dataclass
class Encode:
    """One run of ``get_image_features``, for the next prefill: its layout inputs, how many
    images it encoded (None if unknown) and what the encoder cut did (``encoder``, its state;
    None when the cut was not armed)."""

    layout_inputs: dict[str, Any]
    images: int | None = None
    encoder: Any = None


@dataclass
class ForwardInputs:
    """What the base model received in the running forward.

    ``image_mask`` (B, L) bool: image placeholders (None without ``input_ids`` and
    ``inputs_embeds``); ``input_ids`` (B, L) or None when the forward got ``inputs_embeds``;
    ``embeds``: those ``inputs_embeds`` (else None); ``layout_inputs``: ``image_sizes`` /
    ``image_grid_thw`` passed to the forward; ``cache``; ``features``: the precomputed image
    features object (``mm_encoder_outputs["image"]``, as ``generate`` passes it) or None;
    ``new_images``: pixels or image features are fed in this forward; ``images``: (object,
    token) by which the steps of one uncached ``generate`` recognise their images: the
    precomputed features object with None (``generate`` passes the same one at every step), or,
    inside a ``generate`` call, its ``pixel_values`` with that call's token (transformers before
    5.24 feeds the pixels again at every step); None otherwise.
    """

    image_mask: torch.Tensor | None
    input_ids: torch.Tensor | None
    embeds: torch.Tensor | None
    layout_inputs: dict[str, Any]
    cache: Any
    features: Any
    new_images: bool
    images: tuple[Any, Any] | None = None


class EncoderArming(Protocol):
    """What the tracker tells the encoder cut around an encode that belongs to a prefill."""

    def arm(self, encode: Encode) -> None: ...

    def disarm(self) -> None: ...


class Shadow(PatchPart):
    """Shadow ``obj.name`` (a bound method) with an instance attribute calling
    ``around(original, args, kwargs)``.

    The shadow carries the original's name, docstring and signature (``__wrapped__``), which
    ``generate`` inspects; :meth:`remove` deletes the instance attribute, restoring the class
    method. In a deep copy of the model it shadows the copy's method.
    """

    def __init__(self, obj: Any, name: str,
                 around: Callable[[Callable[..., Any], tuple, dict], Any]) -> None:
        self.obj = obj
        self.name = name
        self.around = around
        self.original = getattr(obj, name)
        functools.update_wrapper(self, self.original)
        obj.__dict__[name] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.around(self.original, args, kwargs)

    def remove(self) -> None:
        """Restore the class method (idempotent)."""
        if self.obj.__dict__.get(self.name) is self:
            del self.obj.__dict__[self.name]


class CallTracker(PatchPart):
    """Installs the shadows and base-model hooks above; the cuts read :attr:`forward` and
    :meth:`take_encode`.

    ``generate_checks`` run on ``generate``'s keyword arguments and ``forward_checks`` on each
    forward's :class:`ForwardInputs`, before any compute; they raise to refuse the call.
    """

    forward = ThreadLocal()
    _encode = ThreadLocal()
    _depth = ThreadLocal(0)
    _generating = ThreadLocal(0)
    _call = ThreadLocal()
    """A fresh token per outermost ``generate`` call in this thread (None outside one)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.encoder: EncoderArming | None = None
        self.generate_checks: list[Callable[[dict[str, Any]], None]] = []
        self.forward_checks: list[Callable[[ForwardInputs], None]] = []

    def install(self) -> list[RemovableHandle | Shadow]:
        """Register the shadows and hooks; the caller keeps the handles."""
        base = self.adapter.base
        return [
            Shadow(self.adapter.model, "generate", self._generate),
            Shadow(base, "get_image_features", self._encode_call),
            base.register_forward_pre_hook(self._enter, with_kwargs=True),
            base.register_forward_hook(self._exit, always_call=True),
        ]

    def take_encode(self) -> Encode | None:
        """The image encode since the last prefill (None when none ran: features passed
        precomputed); consumed: a later prefill does not see it."""
        encode, self._encode = self._encode, None
        return encode

    def _generate(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        for check in self.generate_checks:
            check(kwargs)
        outermost = not self._generating
        if outermost:
            self._call = object()
        self._generating += 1
        try:
            return original(*args, **kwargs)
        finally:
            self._generating -= 1
            if outermost:
                self._call = None

    def _encode_call(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        encode = self._begin_encode(original, args, kwargs)
        out = None
        try:
            out = original(*args, **kwargs)
        finally:
            self._end_encode(encode, out)
        return out

    @eager_hook
    def _begin_encode(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Encode:
        """Record an encode; arm the encoder cut if it belongs to a forward or ``generate``."""
        arguments = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        encode = Encode({k: arguments[k] for k in LAYOUT_INPUTS if arguments.get(k) is not None})
        if self.encoder is not None and (self._depth or self._generating):
            self.encoder.arm(encode)
        return encode

    @eager_hook
    def _end_encode(self, encode: Encode, out: Any) -> None:
        """Disarm the encoder cut; a finished encode is the next prefill's."""
        if self.encoder is not None:
            self.encoder.disarm()
        if out is None:
            return
        pooled = getattr(out, "pooler_output", None)
        encode.images = len(pooled) if isinstance(pooled, (list, tuple)) else None
        self._encode = encode

    @eager_hook
    def _enter(self, module: Any, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        features = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        pixels = kwargs.get("pixel_values")
        images = None
        if features is not None:
            images = (features, None)
        elif pixels is not None and self._call is not None:
            images = (pixels, self._call)
        inputs = ForwardInputs(
            image_mask=self._image_mask(input_ids, embeds),
            input_ids=input_ids,
            embeds=embeds if input_ids is None else None,
            layout_inputs={k: kwargs[k] for k in LAYOUT_INPUTS if kwargs.get(k) is not None},
            cache=passed_cache(kwargs),
            features=features,
            new_images=pixels is not None or features is not None,
            images=images,
        )
        for check in self.forward_checks:
            check(inputs)
        self._depth += 1
        self.forward = inputs

    @eager_hook
    def _exit(self, module: Any, args: tuple, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        self.forward = None

    def _image_mask(self, input_ids: Any, embeds: Any) -> torch.Tensor | None:
        """(B, L) image placeholders: ``input_ids == image_token_id`` or, from embeddings alone,
        the rows equal to the image token's embedding (transformers' ``get_placeholder_mask``)."""
        token = self.adapter.image_token_id
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            return input_ids == token
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            return None
        table = self.adapter.base.get_input_embeddings()
        placeholder = table(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
        return (embeds == placeholder).all(-1)
