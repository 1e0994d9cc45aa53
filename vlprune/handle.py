"""The handle of a patched model: its hooks, statistics and removal.

:class:`PatchHandle` builds the cuts a method needs (``vlprune.hooks``), installs them, turns
their records into :class:`~vlprune.stats.PruneStats` and removes them again; it registers
itself in :mod:`vlprune.patched`, which keeps the one active handle of each patched model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

from vlprune.adapters import Adapter
from vlprune.budget import Budget
from vlprune.compat import CACHE_KWARG, passed_cache
from vlprune.hooks.calls import CallTracker, ForwardInputs, Shadow
from vlprune.hooks.decoder import DecoderCut
from vlprune.hooks.decoder_state import CutContext
from vlprune.hooks.encoder import EncoderCut
from vlprune.hooks.encoder_state import EncoderCutContext
from vlprune.hooks.images import ImageTokens
from vlprune.hooks.loss import KeptRowsLoss
from vlprune.hooks.state import PatchPart, eager_hook
from vlprune.hooks.vision import VisionCut
from vlprune.keptmap import KeptImage, kept_images
from vlprune.methods.base import DecoderBatch, EncoderBatch, Method, VisionBatch
from vlprune.patched import _PATCHED, register
from vlprune.stats import PruneStats


class PatchHandle(PatchPart):
    """A patched model: ``.stats`` of the last prefill, ``.unpatch()`` and context-manager use.

    ``positions``: "original" (kept rows keep their RoPE positions) or "renumber" (renumbered
    contiguously after every cut, as most official LLaVA code does; ``vlprune.hooks.positions``).

    The model's hooks hold the handle (a dropped handle keeps pruning: get it back with
    ``vlprune.get_handle(model)``, or call ``vlprune.unpatch(model)``). ``copy.deepcopy(model)``
    gives a copy patched with its own handle; a patched model cannot be pickled
    (``torch.save(model)``).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, method: Method, budget: Budget,
                 positions: str = "original") -> None:
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self._hooks: list[RemovableHandle | Shadow] = []
        self._calls = CallTracker(adapter)
        has_vision = "vision" in method.stage
        self._vision = VisionCut(adapter, self._calls,
                                 self._select_vision if has_vision else None, positions)
        self._decoder: DecoderCut | None = None
        if "decoder" in method.stage:
            n_layers = len(adapter.decoder_layers)
            self._decoder = DecoderCut(adapter, method.cut_layers(n_layers), self._choose_rows,
                                       self._vision, positions)
        self._probes: dict[str, Any] = method.probes(adapter)
        self._encoder: EncoderCut | None = None
        encoder_layers = method.encoder_layers(adapter.vision_output_layer) if has_vision else []
        if encoder_layers:
            self._encoder = EncoderCut(adapter, encoder_layers, self._choose_encoder,
                                       method.check_encoder_layouts)
            self._calls.encoder = self._encoder
        self._needs_encode = self._encoder is not None or any(
            getattr(probe, "vision", False) for probe in self._probes.values()
        )
        self._loss = KeptRowsLoss(model, self._kept_positions)
        self._calls.generate_checks.append(self._check_generate)
        self._calls.forward_checks.append(self._check_forward)
        self._settings = {"method": method.name, **budget.as_dict(), "positions": positions,
                          **method.settings()}

    @property
    def active(self) -> bool:
        """True until :meth:`unpatch` is called."""
        return bool(self._hooks)

    @property
    def probes(self) -> dict[str, Any]:
        """The signal probes the method asked for, by name (a copy of the mapping)."""
        return dict(self._probes)

    @property
    def stats(self) -> PruneStats:
        """Kept tokens of the last prefill in the calling thread (empty lists before the first
        forward with images)."""
        stats = PruneStats(method=self.method.name, settings=dict(self._settings))
        record = self._vision.last
        if record is None:
            return stats
        if self._encoder is not None:
            stats.vision_layer_tokens = self._encoder.layer_tokens(record.encode)
        n_layers = len(self.adapter.decoder_layers)
        length = record.index.shape[1]
        stats.visual_tokens = list(record.visual_tokens)
        stats.kept_tokens = record.is_image.sum(1).tolist()
        stats.seq_len = record.orig_len
        stats.kept_seq_len = length
        stats.layer_tokens = [[length] * n_layers for _ in stats.visual_tokens]
        if record.selection is not None:
            stats.kept_per_image = list(record.selection.kept_per_image)
        state = self._decoder.last if self._decoder is not None else None
        if state is not None:
            stats.kept_tokens = state.is_image.sum(1).tolist()
            stats.layer_tokens = [list(row) for row in state.layer_tokens]
        return stats

    def kept_images(self) -> list[KeptImage]:
        """Per image of the last prefill in the calling thread, the visual tokens alive after
        the last cut, with their token grids and pixel masks (:func:`vlprune.keptmap.kept_images`;
        empty before the first forward with images)."""
        return kept_images(self)

    def _install(self) -> None:
        """Install every hook, or none: a failure removes what was installed and re-raises."""
        try:
            self._install_all()
        except BaseException:
            self.unpatch()
            raise

    def _install_all(self) -> None:
        self._hooks.extend(self._calls.install())
        self._hooks.extend(self._vision.install())
        if self._encoder is not None:
            self._hooks.extend(self._encoder.install())
        for probe in self._probes.values():
            self._hooks.append(probe.install())
        if self._decoder is not None:
            self._hooks.extend(self._decoder.install())
        if self._probes:
            self._hooks.append(self.adapter.language_model.register_forward_hook(self._clear_probes))
        self._hooks.extend(self._loss.install())

    @eager_hook
    def _clear_probes(self, *_: Any) -> None:
        for probe in self._probes.values():
            probe.clear()

    def _check_generate(self, kwargs: dict[str, Any]) -> None:
        """Refuse, before any compute, a ``generate`` call vlprune cannot run correctly."""
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        implementation = kwargs.get(
            "cache_implementation", getattr(config, "cache_implementation", None)
        )
        cache = passed_cache(kwargs)
        if implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS or _is_static(cache):
            raise NotImplementedError(STATIC_CACHE_ERROR)
        images = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs")
        if images and cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(NEW_IMAGES_ERROR)

    def _check_forward(self, inputs: ForwardInputs) -> None:
        """Refuse, before the image encoder or the language model runs, a forward vlprune cannot
        prune correctly."""
        cache = inputs.cache
        if _is_static(cache):
            raise NotImplementedError(STATIC_CACHE_ERROR)
        if inputs.new_images and cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(NEW_IMAGES_ERROR)

    def _kept_positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Original positions of the rows the running prefill's logits cover and which are real
        (False on padding slots); None when it pruned nothing (or is no prefill)."""
        record = self._vision.current
        if record is None or record.replay or self._vision.decoding:
            return None
        positions, real = record.index, record.valid
        state = self._decoder.current if self._decoder is not None else None
        if state is not None and state.layer_index:
            positions, real = positions.gather(1, state.index), real.gather(1, state.index)
            if state.slots is not None:
                real = real & state.slots
        if positions.shape[1] == record.orig_len and bool(real.all()):
            return None
        return positions, real

    @torch.no_grad()
    def _choose_rows(
        self, ctx: CutContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        record = self._vision.current
        batch = DecoderBatch(
            layer=ctx.layer,
            hidden=ctx.hidden,
            is_image=ctx.is_image,
            probes=self._probes,
            index=ctx.index,
            layer_index=ctx.layer_index,
            valid=ctx.valid,
            input_visual=ctx.input_visual,
            image_tokens=record.selection.image_tokens if record.selection else [],
            layer_valid=ctx.layer_valid,
            input_valid=ctx.input_valid,
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
        if self._needs_encode and tokens.encode is None:
            raise RuntimeError(
                f"method {self.method.name!r} scores images inside the vision encoder, which did "
                "not run for this prefill: image features passed precomputed "
                "(`mm_encoder_outputs`) cannot be pruned by it; pass the pixel values instead"
            )
        keep = self.method.budgets(tokens.layouts, self.budget)
        units = None
        if self._encoder is not None:
            units = self._encoder.units_per_image(tokens.encode, tokens.layouts)
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
            attention_mask=tokens.attention_mask,
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

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchHandle:
        new = super().__deepcopy__(memo)
        if isinstance(new, PatchHandle) and new.active:
            register(new)
        return new

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({type(self.model).__name__}, {self._settings}, {state})"


STATIC_CACHE_ERROR = (
    "vlprune does not support static KV caches (generate(cache_implementation='static'), "
    "StaticCache): its cuts change sequence lengths in Python hooks that compiled static-cache "
    "decoding cannot follow. Use the default dynamic cache"
)


NEW_IMAGES_ERROR = (
    "vlprune prunes the images of a prefill: this forward feeds new images while continuing a "
    "KV cache (a new image in a follow-up turn, or a chunked prefill). Start the turn that "
    f"brings the image without `{CACHE_KWARG}`, or pass prefill_chunk_size=None"
)


def _is_static(cache: Any) -> bool:
    """A cache of fixed-size (compileable) layers, e.g. ``StaticCache``."""
    return cache is not None and bool(getattr(cache, "is_compileable", False))


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
