"""The one entry point: ``patch(model, method, budget=...)`` → :class:`PatchHandle`."""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.adapters import Adapter, get_adapter
from vlprune.budget import Budget
from vlprune.hooks.decoder import CutContext, DecoderCut
from vlprune.hooks.encoder import EncoderCut, EncoderCutContext
from vlprune.hooks.vision import CallRecorder, ImageTokens, VisionCut
from vlprune.methods.base import DecoderBatch, EncoderBatch, Method, VisionBatch
from vlprune.registry import build_method, get_method, list_methods

# model -> weak reference to its handle: the model's hooks keep the handle alive, and neither
# reference keeps a dropped model alive.
_PATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[PatchHandle]] = (
    weakref.WeakKeyDictionary()
)


class AlreadyPatchedError(RuntimeError):
    """Raised when patching a model that vlprune already patched."""


@dataclass
class PruneStats:
    """What the last forward pass pruned (prefill), per sample unless named otherwise.

    ``visual_tokens``: image placeholders in the prompt; ``kept_tokens``: visual tokens that
    reach the language model (after the last decoder cut for decoder-side methods);
    ``kept_per_image``: visual tokens into the LLM per image (vision-side cut); ``seq_len`` /
    ``kept_seq_len``: sequence length before / after the vision-side cut (padded batch width);
    ``layer_tokens``: sequence length entering each decoder layer.
    ``vision_layer_tokens``: per image, rows entering each vision-encoder layer in the last
    image forward (summed over its crops / frames, CLS included); empty without an encoder cut.
    """

    method: str
    settings: dict[str, Any]
    visual_tokens: list[int] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    kept_per_image: list[int] = field(default_factory=list)
    seq_len: int = 0
    kept_seq_len: int = 0
    layer_tokens: list[list[int]] = field(default_factory=list)
    vision_layer_tokens: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view (JSON-serialisable)."""
        return asdict(self)


class PatchHandle:
    """A patched model: ``.stats`` of the last prefill, ``.unpatch()`` and context-manager use."""

    def __init__(self, model: nn.Module, adapter: Adapter, method: Method, budget: Budget) -> None:
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self._hooks: list[RemovableHandle | CallRecorder] = []
        has_vision = "vision" in method.stage
        self._vision = VisionCut(adapter, self._select_vision if has_vision else None)
        self._decoder: DecoderCut | None = None
        if "decoder" in method.stage:
            n_layers = len(adapter.decoder_layers)
            self._decoder = DecoderCut(
                adapter, method.cut_layers(n_layers), self._choose_rows,
                image_mask=lambda: self._vision.lm_image_mask,
            )
        self._probes: dict[str, Any] = method.probes(adapter)
        self._encoder: EncoderCut | None = None
        encoder_layers = method.encoder_layers(adapter.vision_output_layer) if has_vision else []
        if encoder_layers:
            self._encoder = EncoderCut(adapter, encoder_layers, self._choose_encoder)
        self._settings = {"method": method.name, **budget.as_dict(), **method.settings()}

    @property
    def active(self) -> bool:
        """True until :meth:`unpatch` is called."""
        return bool(self._hooks)

    @property
    def stats(self) -> PruneStats:
        """Kept tokens of the last prefill (empty lists before the first forward)."""
        stats = PruneStats(method=self.method.name, settings=dict(self._settings))
        if self._encoder is not None:
            stats.vision_layer_tokens = self._encoder.layer_tokens()
        vision = self._vision
        if vision.lm_image_mask is None:
            return stats
        n_layers = len(self.adapter.decoder_layers)
        visual = vision.lm_image_mask.sum(1).tolist()
        length = vision.lm_image_mask.shape[1]
        stats.visual_tokens = stats.kept_tokens = visual
        stats.seq_len = stats.kept_seq_len = length
        stats.layer_tokens = [[length] * n_layers for _ in visual]
        if vision.record is not None:
            stats.visual_tokens = list(vision.record.visual_tokens)
            stats.kept_per_image = list(vision.record.kept_per_image)
            stats.seq_len = vision.record.seq_len
        if self._decoder is not None and self._decoder.state is not None:
            stats.kept_tokens = self._decoder.state.is_image.sum(1).tolist()
            stats.layer_tokens = [list(row) for row in self._decoder.layer_tokens]
        return stats

    def _install(self) -> None:
        """Install every hook, or none: a failure removes what was installed and re-raises."""
        try:
            self._install_all()
        except BaseException:
            self.unpatch()
            raise

    def _install_all(self) -> None:
        self._hooks.extend(self._vision.install())
        if self._encoder is not None:
            self._hooks.extend(self._encoder.install())
        for probe in self._probes.values():
            self._hooks.append(probe.install())
        if self._decoder is not None:
            self._hooks.extend(self._decoder.install())
        if self._probes:
            self._hooks.append(self.adapter.language_model.register_forward_hook(self._clear_probes))

    def _clear_probes(self, *_: Any) -> None:
        for probe in self._probes.values():
            probe.clear()

    @torch.no_grad()
    def _choose_rows(
        self, ctx: CutContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        batch = DecoderBatch(
            layer=ctx.layer,
            hidden=ctx.hidden,
            is_image=ctx.is_image,
            probes=self._probes,
            index=ctx.index,
            layer_index=ctx.layer_index,
            valid=ctx.valid,
            input_visual=ctx.input_visual,
            image_tokens=self._vision.record.image_tokens if self._vision.record else [],
        )
        rows = self.method.choose(batch, self.budget)
        index = rows[0] if isinstance(rows, tuple) else rows
        if index is not None and index.shape[0] != ctx.hidden.shape[0]:
            raise RuntimeError(f"method {self.method.name!r} returned rows for a wrong batch size")
        return rows

    @torch.no_grad()
    def _choose_encoder(self, ctx: EncoderCutContext) -> list[torch.Tensor] | None:
        batch = EncoderBatch(**vars(ctx), probes=self._probes)
        return self.method.encoder_choose(batch, self.budget)

    @torch.no_grad()
    def _select_vision(self, tokens: ImageTokens) -> list[torch.Tensor]:
        keep = self.method.budgets(tokens.layouts, self.budget)
        units = None
        if self._encoder is not None:
            units = self._encoder.units_per_image(tokens.layouts)
        batch = VisionBatch(
            layouts=tokens.layouts,
            keep=keep,
            features=tokens.features(),
            sample=tokens.sample,
            input_ids=tokens.input_ids,
            text_embeds=tokens.inputs_embeds,
            probes=self._probes,
            positions=tokens.positions,
            budget=self.budget,
            encoder_units=units,
        )
        kept = self.method.select(batch)
        if units is not None:
            keep = [int(k.numel()) for k in kept]  # the encoder cut bounded the counts
        _check_selection(self.method.name, kept, keep, tokens.layouts)
        return kept

    def unpatch(self) -> None:
        """Remove every hook; the model behaves exactly as before :func:`patch`. Idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        ref = _PATCHED.get(self.model)
        if ref is not None and ref() is self:
            del _PATCHED[self.model]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({type(self.model).__name__}, {self._settings}, {state})"


def _check_selection(
    name: str, kept: list[torch.Tensor], keep: list[int], layouts: list[Any]
) -> None:
    """Every image keeps exactly its count, as sorted unique in-range indices (one sync each)."""
    if len(kept) != len(keep):
        raise RuntimeError(
            f"method {name!r} returned {len(kept)} selections for {len(keep)} images"
        )
    for i, (idx, k, layout) in enumerate(zip(kept, keep, layouts)):
        if idx.dim() != 1 or idx.numel() != k:
            raise RuntimeError(
                f"method {name!r} kept {idx.numel()} tokens of image {i}, expected {k}"
            )
        if k == 0:
            continue
        ordered = (idx[0] >= 0) & (idx[-1] < layout.num_tokens) & (idx.diff() > 0).all()
        if not bool(ordered):
            raise RuntimeError(
                f"method {name!r}: indices of image {i} are not sorted, unique, in range"
            )


def patch(
    model: nn.Module,
    method: str,
    *,
    budget: int | None = None,
    ratio: float | None = None,
    **options: Any,
) -> PatchHandle:
    """Prune visual tokens of ``model`` with ``method``; returns a :class:`PatchHandle`.

    Exactly one of ``budget`` (visual tokens kept per unit of the method's scope: per image for
    most methods; a budget larger than an image keeps all of it) or ``ratio`` (kept fraction in
    (0, 1]). ``options`` are the method's own keyword options (see ``available_methods()``).
    Everything is validated before any hook is installed or any compute runs: bad values raise
    ``ValueError``, an unsupported model ``TypeError``, an already patched model
    :class:`AlreadyPatchedError`. A timm ``VisionTransformer`` is patched by
    :func:`vlprune.timm.patch_timm` (option ``cut_block``).
    """
    from vlprune.timm import is_timm_model, patch_timm  # timm ViTs have their own hooks

    if is_timm_model(model):
        return patch_timm(model, method, budget=budget, ratio=ratio, **options)
    budget_ = Budget(tokens=budget, ratio=ratio)
    get_method(method)
    adapter = get_adapter(model)
    method_ = build_method(method, options)
    method_.check_model(adapter)
    existing = _PATCHED.get(model)
    if existing is not None and existing() is not None:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched ({existing()!r}); "
            "call .unpatch() on that handle first"
        )
    handle = PatchHandle(model, adapter, method_, budget_)
    handle._install()
    _PATCHED[model] = weakref.ref(handle)
    return handle


def available_methods() -> list[dict[str, Any]]:
    """Registered methods with their stage, budget scope, supported families and citations."""
    rows = []
    for name in list_methods():
        cls = get_method(name)
        rows.append({
            "name": name,
            "stage": cls.stage,
            "scope": cls.scope,
            "families": list(cls.families) if cls.families else "all",
            "paper": cls.paper,
            "repo": cls.repo,
        })
    return rows
