"""The vision-side cut: drop unselected image rows before the language model.

Two pre-hooks and one call recorder, driven by the adapter:

1. on the multimodal base model (``model.model``): remember the prompt's ``input_ids``
   (positional or keyword);
2. around the base model's ``get_image_features`` (an instance attribute shadowing the class
   method, removed on unpatch): remember the image-layout inputs (``image_sizes`` /
   ``image_grid_thw``). ``generate`` encodes images *before* the first forward and drops those
   inputs from the forward's kwargs, so this is the one place that sees them in both paths;
3. on the language model: in prefill, ask the selector which image tokens to keep and gather
   ``inputs_embeds``, the 2-D ``attention_mask`` and ``position_ids`` (original positions, 1-D or
   M-RoPE); in decode, narrow generate's full-length mask to the pruned cache.

Rows of a batch that keep different counts are left-padded (masked) to the longest row.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.deepstack import gather_deepstack_inputs
from vlprune.hooks.gather import gather_mask, gather_positions, gather_rows, left_packed_index

LAYOUT_INPUTS = ("image_sizes", "image_grid_thw", "batch_num_images", "vision_aspect_ratio")


@dataclass
class ImageTokens:
    """The images of one prefill: per image its layout, sequence positions (N_i,) and row."""

    layouts: list[ImageLayout]
    positions: list[torch.Tensor]
    sample: list[int]
    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor

    def features(self) -> list[torch.Tensor]:
        """Per image, its (N_i, D) rows of ``inputs_embeds``."""
        return [self.inputs_embeds[s, p] for s, p in zip(self.sample, self.positions)]


Selector = Callable[[ImageTokens], list[torch.Tensor]]
"""Returns, per image, the sorted local indices of the tokens it keeps."""


@dataclass
class VisionCutRecord:
    """What the last prefill did, per sample: visual tokens before and after, sequence lengths;
    ``image_tokens[b]``: placeholders of each image of sample b."""

    visual_tokens: list[int]
    kept_tokens: list[int]
    seq_len: int
    kept_seq_len: int
    kept_per_image: list[int]
    image_tokens: list[list[int]] = field(default_factory=list)


def split_images(
    input_ids: torch.Tensor, image_token_id: int, layouts: list[ImageLayout]
) -> tuple[list[torch.Tensor], list[int]]:
    """Assign the placeholder positions of each row to consecutive images, in order."""
    positions: list[torch.Tensor] = []
    sample: list[int] = []
    image = 0
    for row in range(input_ids.shape[0]):
        row_pos = (input_ids[row] == image_token_id).nonzero().squeeze(1)
        start = 0
        while start < row_pos.numel():
            if image >= len(layouts):
                raise ValueError("more image placeholders than images in the inputs")
            size = layouts[image].num_tokens
            positions.append(row_pos[start:start + size])
            sample.append(row)
            start += size
            image += 1
        if start != row_pos.numel():
            raise ValueError(f"row {row}: image placeholders do not split into whole images")
    return positions, sample


def _repeat_per_prompt(
    layouts: list[ImageLayout], prompt_counts: list[int], repeats: int
) -> list[ImageLayout]:
    """Repeat each prompt's consecutive layouts (``prompt_counts`` tokens each) ``repeats``×."""
    out: list[ImageLayout] = []
    image = 0
    for count in prompt_counts:
        chunk: list[ImageLayout] = []
        while sum(layout.num_tokens for layout in chunk) < count:
            chunk.append(layouts[image])
            image += 1
        out.extend(chunk * repeats)
    return out


class CallRecorder:
    """Shadow ``obj.name`` (a bound method) with a wrapper that reports each call's arguments.

    The wrapper keeps the original's signature (``functools.wraps``), which ``generate``
    inspects; :meth:`remove` deletes the instance attribute, restoring the class method.
    """

    def __init__(self, obj: Any, name: str, callback: Callable[[dict[str, Any]], None]) -> None:
        self.obj = obj
        self.name = name
        original = getattr(obj, name)
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            callback(signature.bind_partial(*args, **kwargs).arguments)
            return original(*args, **kwargs)

        self.wrapper = wrapper
        obj.__dict__[name] = wrapper

    def remove(self) -> None:
        """Restore the class method (idempotent)."""
        if self.obj.__dict__.get(self.name) is self.wrapper:
            del self.obj.__dict__[self.name]


class VisionCut:
    """Installs the two pre-hooks; ``selector`` returns kept local indices per image.

    With ``selector=None`` nothing is cut: the hooks only record which language-model input rows
    are image tokens (``lm_image_mask``), which decoder-side methods need.
    """

    def __init__(self, adapter: Adapter, selector: Selector | None) -> None:
        self.adapter = adapter
        self.selector = selector
        self.inputs: dict[str, Any] = {}
        self.layout_inputs: dict[str, Any] = {}
        self.active = False
        self.orig_len = 0
        self.prefill_mask: torch.Tensor | None = None
        self.prefill_full = True
        self.kept_len = 0
        self.dropped = 0
        self.record: VisionCutRecord | None = None
        self.lm_image_mask: torch.Tensor | None = None

    def install(self) -> list[RemovableHandle | CallRecorder]:
        """Register the hooks; the caller keeps the handles."""
        return [
            self.adapter.base.register_forward_pre_hook(self._remember, with_kwargs=True),
            CallRecorder(self.adapter.base, "get_image_features", self._remember_layout),
            self.adapter.language_model.register_forward_pre_hook(self._cut, with_kwargs=True),
        ]

    def _remember(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None)}

    def _remember_layout(self, arguments: dict[str, Any]) -> None:
        self.layout_inputs = {
            k: arguments[k] for k in LAYOUT_INPUTS if arguments.get(k) is not None
        }

    def _cut(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            return self._decode(args, kwargs, cache)
        self.active = False
        self.lm_image_mask = None
        embeds = kwargs.get("inputs_embeds")
        input_ids = self.inputs.get("input_ids")
        if embeds is None or input_ids is None or input_ids.shape != embeds.shape[:2]:
            return None
        is_image = input_ids == self.adapter.image_token_id
        if not bool(is_image.any()):
            return None
        if self.selector is None:
            self.lm_image_mask = is_image
            return None
        layouts = self._layouts(is_image.sum(1).tolist())
        positions, sample = split_images(input_ids, self.adapter.image_token_id, layouts)
        tokens = ImageTokens(layouts, positions, sample, input_ids, embeds)
        kept = self.selector(tokens)
        return args, self._prefill(kwargs, tokens, kept, is_image)

    def _layouts(self, counts: list[int]) -> list[ImageLayout]:
        """Image layouts for rows holding ``counts`` placeholders each.

        ``generate(num_beams=r)`` / ``num_return_sequences=r`` encode each prompt's images once,
        then repeat every prompt row r times: the layouts of each prompt are repeated to match.
        """
        try:
            return self.adapter.image_layouts(self.layout_inputs, sum(counts))
        except ValueError:
            for r in range(2, len(counts) + 1):
                groups = [counts[g:g + r] for g in range(0, len(counts), r)]
                if len(counts) % r or any(len(set(group)) > 1 for group in groups):
                    continue
                try:
                    base = self.adapter.image_layouts(self.layout_inputs, sum(counts[::r]))
                except ValueError:
                    continue
                return _repeat_per_prompt(base, counts[::r], r)
            raise

    def _prefill(
        self, kwargs: dict, tokens: ImageTokens, kept: list[torch.Tensor], is_image: torch.Tensor
    ) -> dict:
        embeds = kwargs["inputs_embeds"]
        length = is_image.shape[1]
        keep = ~is_image
        rows = torch.cat([torch.full_like(k, s) for s, k in zip(tokens.sample, kept)])
        cols = torch.cat([p[k] for p, k in zip(tokens.positions, kept)])
        keep[rows, cols] = True
        index, valid = left_packed_index(keep)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("vlprune's vision cut needs a 2-D attention_mask (or None)")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=embeds.device).unsqueeze(0)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = gather_rows(embeds, index)
        kwargs["attention_mask"] = gather_mask(mask, index, valid)
        kwargs["position_ids"] = gather_positions(position_ids, index)
        kwargs = gather_deepstack_inputs(kwargs, index, valid)
        self.active = True
        self.orig_len = length
        self.prefill_mask = kwargs["attention_mask"]
        self.prefill_full = bool(self.prefill_mask.all())
        self.kept_len = index.shape[1]
        self.dropped = length - self.kept_len
        self.lm_image_mask = is_image.gather(1, index) & valid
        self.record = VisionCutRecord(
            visual_tokens=is_image.sum(1).tolist(),
            kept_tokens=(keep & is_image).sum(1).tolist(),
            seq_len=length,
            kept_seq_len=index.shape[1],
            kept_per_image=[int(k.numel()) for k in kept],
            image_tokens=[
                [lay.num_tokens for lay, s in zip(tokens.layouts, tokens.sample) if s == row]
                for row in range(is_image.shape[0])
            ],
        )
        return kwargs

    def _decode(self, args: tuple, kwargs: dict, cache: Any) -> tuple[tuple, dict] | None:
        """Keep a decode step consistent with the pruned cache (O(1) work besides the mask cat).

        A mask from ``generate`` is full-length: its prompt part is replaced by the pruned
        prefill mask. Without position ids (a hand-written decode loop) the language model would
        count positions from the pruned cache length: they are shifted back to the original ones.
        """
        if not self.active or self.prefill_mask is None:
            return None
        kwargs = dict(kwargs)
        steps = kwargs["inputs_embeds"].shape[1]
        if kwargs.get("position_ids") is None and self.dropped:
            start = cache.get_seq_length() + self.dropped
            positions = torch.arange(start, start + steps, device=self.prefill_mask.device)
            kwargs["position_ids"] = positions.unsqueeze(0)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            new = mask[:, self.orig_len:].to(self.prefill_mask)
            kwargs["attention_mask"] = torch.cat([self.prefill_mask, new], 1)
        elif not self.prefill_full:
            new = self.prefill_mask.new_ones(
                self.prefill_mask.shape[0], cache.get_seq_length() + steps - self.kept_len
            )
            kwargs["attention_mask"] = torch.cat([self.prefill_mask, new], 1)
        return args, kwargs
