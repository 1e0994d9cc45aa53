"""``vlprune.patch`` for timm ViTs: validation, the handle, its stats and kept indices.

A timm patch has the lifecycle of every vlprune patch (:class:`~vlprune.PatchHandle`):
``vlprune.get_handle`` / ``vlprune.unpatch`` find and remove it, a second patch is refused,
threads sharing the model each see their own forward, ``copy.deepcopy(model)`` gives a copy
patched with its own handle, pickling (``torch.save(model)``) raises, a model compiled before
patching is refused and one compiled after patching runs the hooks eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.api import check_not_compiled
from vlprune.budget import Budget
from vlprune.handle import PatchHandle
from vlprune.hooks.calls import Shadow
from vlprune.methods.base import EncoderBatch, Method, VisionBatch
from vlprune.patched import check_not_patched, register
from vlprune.registry import build_method, get_method
from vlprune.stats import PruneStats
from vlprune.timm.adapter import NoLanguageModelError, TimmViTAdapter, check_supported
from vlprune.timm.cut import TimmCut

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"todre": {"stage2": False}}
"""Options a method gets on a timm ViT unless given: ToDRE's stage 2 needs a language model."""


@dataclass
class TimmPruneStats(PruneStats):
    """:class:`~vlprune.PruneStats` of a timm ViT's last forward in the calling thread, per image.

    ``visual_tokens``: patch tokens of the grid; ``kept_tokens`` / ``kept_per_image``: patch
    tokens after the last cut; ``seq_len`` / ``kept_seq_len``: rows before / after it (prefix
    tokens included); ``vision_layer_tokens``: rows entering each block; ``layer_tokens``: empty
    (no language model); ``grid``: (rows, cols) of the patch grid; ``kept_indices``: per image,
    the kept patches' raster indices into the grid (``row * cols + col``), ascending.
    """

    grid: tuple[int, int] | None = None
    kept_indices: list[list[int]] = field(default_factory=list)


class TimmPatchHandle(PatchHandle):
    """A patched timm ViT: ``.stats``, ``.kept_indices``, ``.unpatch()``, context manager.

    Builds timm's cut (:class:`~vlprune.timm.cut.TimmCut`) instead of the Hugging Face cuts and
    keeps :class:`~vlprune.PatchHandle`'s lifecycle: ``active``, ``unpatch``, the registry, deep
    copies, pickling refused.
    """

    def __init__(self, model: nn.Module, adapter: TimmViTAdapter, method: Method, budget: Budget,
                 probes: dict[str, Any]) -> None:
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self._hooks: list[RemovableHandle | Shadow] = []
        self._probes = probes
        self._cut = TimmCut(adapter, method, budget, probes, self._select, self._choose)
        self._settings = {"method": method.name, **budget.as_dict(),
                          "cut_block": adapter.cut_block, **method.settings()}

    def _install_all(self) -> None:
        for probe in self._probes.values():
            self._hooks.append(probe.install())
        self._hooks.extend(self._cut.install())

    @torch.no_grad()
    def _select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """The method's single cut (the cut's hooks call it: they keep the handle alive)."""
        return self.method.select(batch)

    @torch.no_grad()
    def _choose(self, batch: EncoderBatch) -> list[torch.Tensor] | None:
        """The method's encoder stage after one block."""
        return self.method.encoder_choose(batch, self.budget)

    @property
    def kept_indices(self) -> torch.Tensor | None:
        """(B, k) LongTensor of the calling thread's last forward: each image's kept patches as
        raster indices into the patch grid (``row * cols + col``), ascending, in the order the
        output rows after the prefix tokens hold them; None before the first forward."""
        return self._cut.kept_indices

    @property
    def stats(self) -> TimmPruneStats:
        """Tokens of the calling thread's last forward (empty lists before the first one)."""
        stats = TimmPruneStats(method=self.method.name, settings=dict(self._settings))
        state = self._cut.state
        if state is None:
            return stats
        batch, kept = state.kept.shape
        prefix = self.adapter.prefix
        stats.visual_tokens = [state.patches] * batch
        stats.kept_tokens = [kept] * batch
        stats.kept_per_image = [kept] * batch
        stats.seq_len = prefix + state.patches
        stats.kept_seq_len = prefix + kept
        stats.vision_layer_tokens = [list(state.block_rows) for _ in range(batch)]
        stats.grid = tuple(state.grid)
        stats.kept_indices = state.kept.tolist()
        return stats


def patch_timm(
    model: nn.Module,
    method: str,
    *,
    budget: int | None = None,
    ratio: float | None = None,
    cut_block: int | None = None,
    **options: Any,
) -> TimmPatchHandle:
    """Prune the patch tokens of a timm ``VisionTransformer`` (what ``vlprune.patch`` does for a
    timm model; see :mod:`vlprune.timm`).

    ``budget`` / ``ratio``: patch tokens kept per image (prefix tokens always stay);
    ``cut_block``: the block after which tokens are cut (negative counts from the end; default:
    the last block, an output cut). Raises before any hook or compute: ``ValueError`` for bad
    values or a method that needs a language model, ``TypeError`` for an unsupported timm
    architecture (or a method it cannot serve, e.g. one scoring by a class token the model lacks),
    ``RuntimeError`` for a model compiled before patching, :class:`~vlprune.AlreadyPatchedError`
    for a patched model.
    """
    budget_ = Budget(tokens=budget, ratio=ratio)
    cls = get_method(method)
    check_not_compiled(model)
    check_supported(model)
    if "vision" not in cls.stage:
        raise ValueError(
            f"method {method!r} prunes inside a language model ({cls.stage} stage); a timm ViT "
            "has none: use a method with a vision stage"
        )
    adapter = TimmViTAdapter(model, cut_block)
    method_ = build_method(method, {**METHOD_DEFAULTS.get(method, {}), **options})
    try:
        method_.check_model(adapter)
        probes = method_.probes(adapter)
    except NoLanguageModelError as err:
        raise ValueError(f"method {method!r} cannot run on a timm ViT: {err}") from None
    check_not_patched(model)
    handle = TimmPatchHandle(model, adapter, method_, budget_, probes)
    handle._install()
    register(handle)
    return handle
