"""Vision-encoder signals: attention rows of one encoder layer, recomputed on request.

A vision forward attends within independent sequences: one per image or crop (CLIP), one per
image (Qwen full-attention blocks) or per window (Qwen2.5-VL windowed blocks, in window order).
A probe sits on one attention module: a pre-hook keeps references to that call's inputs and
forward hooks on its projections keep their outputs, so q, k and v are the layer's own (nothing is
projected twice); RoPE is applied on request. The wrappers below reduce them without holding a
whole (H, n, n) map.

A sequence's n rows are what methods see and index. A layer may also attend to *context* rows
that no method selects (a timm ViT's register tokens): their keys and values follow the n rows
in ``k`` / ``v`` (``n + c`` rows; ``c`` = 0 for CLIP and Qwen), take part in every softmax, as
in the model, and are never reported: probabilities over the n rows do not sum to 1 then.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.signals.module_probes import HandleGroup, Probe, ProjectionOutputs, WrapperProbe
from vlprune.hooks.signals.recompute import apply_vision_rope
from vlprune.hooks.state import ThreadLocal, eager_hook


class VisionAttentionProbe(Probe):
    """Attention rows of one vision-encoder layer, recomputed on request.

    :meth:`rows` returns one (H, Q, n) tensor per sequence, in the order the layer saw them.
    Subclasses name the projection submodules whose outputs each call keeps (``projections``)
    and say how to read q, k and v off them.
    """

    vision = True
    projections: ClassVar[tuple[str, ...]] = ()
    inputs = ThreadLocal()

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.kept = ProjectionOutputs(attention, self.projections)

    def install(self) -> HandleGroup:
        """Register the pre-hook that remembers the layer's inputs and the hooks that keep its
        projections' outputs."""
        remember = self.attention.register_forward_pre_hook(self._remember, with_kwargs=True)
        return HandleGroup([remember, self.kept.install()])

    @eager_hook
    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.inputs = {"hidden": hidden, **rest}

    def clear(self) -> None:
        """Drop the references to the last call's inputs and projections."""
        self.inputs = None
        self.kept.clear()

    def projection(self, name: str) -> torch.Tensor:
        """Output of projection ``name``: the layer's own, kept from its last call, or projected
        here where none was kept (a compiled model does not run hooks on its projections)."""
        out = self.kept.get(name)
        if out is None:
            out = getattr(self.attention, name)(self.checked_inputs()["hidden"])
        return out

    def checked_inputs(self) -> dict[str, Any]:
        """The last call's inputs; ``RuntimeError`` if the layer has not run."""
        if self.inputs is None:
            raise RuntimeError("the probed vision layer has not run yet in this forward")
        return self.inputs

    def qkv(
        self, bounds: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sequence: q (H, n, d), k (after any RoPE) and v (H, n + c, d: the n rows, then
        any context rows, see the module doc), in the layer's row order.

        ``bounds`` (cumulative row boundaries) splits packed rows differently from the layer's
        own sequences; batched rows are their own sequences and take none.
        """
        raise NotImplementedError

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence: q (H, n, d) and k (H, n + c, d), after any RoPE."""
        return [(q, k) for q, k, _ in self.qkv()]

    @torch.no_grad()
    def rows(self, queries: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per sequence, float32 probabilities (H, Q, n) of query rows ``queries`` (local
        indices, e.g. ``[0]`` for CLIP's CLS), or of every row when None; context keys are in
        the softmax, not in the result."""
        self.checked_inputs()
        out = []
        for q, k in self.query_key():
            n = q.shape[1]
            if queries is not None:
                q = q[:, queries.to(q.device)]
            out.append(((q @ k.transpose(1, 2)) * self.scale).float().softmax(-1)[..., :n])
        return out

    @property
    def scale(self) -> float:
        """The layer's softmax scale (``1/√d``)."""
        return float(getattr(self.attention, "scale", getattr(self.attention, "scaling", 1.0)))


class ClipAttentionProbe(VisionAttentionProbe):
    """CLIP (LLaVA, LLaVA-NeXT): ``q_proj`` / ``k_proj`` / ``v_proj``, no RoPE; one sequence per
    crop (CLS first)."""

    projections = ("q_proj", "k_proj", "v_proj")

    def qkv(
        self, bounds: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per crop: q, k, v of shape (H, 1 + patches, d)."""
        if bounds is not None:
            raise ValueError("batched vision rows are their own sequences; pass no bounds")
        return list(zip(*(self._heads(name) for name in self.projections)))

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per crop: q, k of shape (H, 1 + patches, d)."""
        return list(zip(self._heads("q_proj"), self._heads("k_proj")))

    def _heads(self, name: str) -> torch.Tensor:
        """(crops, H, 1 + patches, d) view of projection ``name``'s output."""
        hidden = self.checked_inputs()["hidden"]
        shape = (*hidden.shape[:-1], -1, self.attention.head_dim)
        return self.projection(name).view(shape).transpose(1, 2)


class QwenVisionAttentionProbe(VisionAttentionProbe):
    """Qwen2-VL / Qwen2.5-VL vision blocks: fused ``qkv``, 2-D vision RoPE, ``cu_seqlens``."""

    projections = ("qkv",)

    def qkv(
        self, bounds: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per ``cu_seqlens`` segment (or ``bounds`` span): q, k, v of shape (H, n, d), q and k
        after the vision RoPE."""
        inputs = self.checked_inputs()
        attn = self.attention
        hidden = inputs["hidden"]
        fused = self.projection("qkv").reshape(hidden.shape[0], 3 * attn.num_heads, -1)
        cos, sin = inputs["position_embeddings"]
        # q and k are adjacent in the fused output: one RoPE call rotates both
        qk = apply_vision_rope(fused[:, : 2 * attn.num_heads], cos, sin)
        (q, k), v = qk.chunk(2, dim=1), fused[:, 2 * attn.num_heads:]
        cuts = bounds if bounds is not None else inputs["cu_seqlens"].tolist()
        return [
            tuple(x[a:b].transpose(0, 1) for x in (q, k, v))
            for a, b in itertools.pairwise(cuts)
        ]


class VisionAttentionScores(WrapperProbe):
    """Reductions of a vision attention probe that never hold a whole (H, n, n) map at once.

    Wraps a :class:`VisionAttentionProbe` made by the adapter (``install`` / ``clear`` are
    delegated): :meth:`received` gives the attention each key receives from all queries,
    :meth:`logits` the pre-softmax scores of some query rows. One entry per vision sequence, in
    the order of :meth:`VisionAttentionProbe.rows`.
    """

    vision = True
    probe: VisionAttentionProbe

    def __init__(self, probe: VisionAttentionProbe, max_elements: int = 1 << 20) -> None:
        super().__init__(probe)
        self.max_elements = max_elements

    @torch.no_grad()
    def received(self) -> list[torch.Tensor]:
        """Per sequence, (n,) float32: ``Σ_queries mean_heads softmax(q·kᵀ·scale)``, i.e. the
        column sums of the head-mean attention map over the sequence's n rows (context keys in
        the softmax). Queries run in chunks of at most ``max_elements`` probabilities (default
        2²⁰: a few MiB, cache-sized) and at most as many as q holds (H·n·d), so the extra
        memory stays that of the layer's own q, never the whole (H, n, n) map."""
        self.probe.checked_inputs()
        out = []
        for q, k in self.probe.query_key():
            heads, n = q.shape[:2]
            keys = k.transpose(1, 2).contiguous()
            limit = min(self.max_elements, q.numel())
            step = max(1, limit // (heads * keys.shape[2]))
            total = torch.zeros(n, dtype=torch.float32, device=k.device)
            for start in range(0, n, step):
                scores = (q[:, start:start + step] @ keys).mul_(self.probe.scale)
                total += scores.float().softmax(-1)[..., :n].sum(dim=(0, 1))
            out.append(total / heads)
        return out

    @torch.no_grad()
    def logits(self, queries: torch.Tensor) -> list[torch.Tensor]:
        """Per sequence, float32 pre-softmax scores ``q·kᵀ·scale`` (H, Q, n) of query rows
        ``queries`` (local indices, e.g. ``[0]`` for CLIP's CLS) over the n rows."""
        self.probe.checked_inputs()
        return [
            ((q[:, queries.to(q.device)] @ k[:, :q.shape[1]].transpose(1, 2))
             * self.probe.scale).float()
            for q, k in self.probe.query_key()
        ]


class GlobalQueryAttention(WrapperProbe):
    """Attention of each vision sequence's mean query: the [CLS] analogue of an encoder without
    one (FlowCut's Qwen2-VL "global query", see ``vlprune.methods.flowcut``).

    Wraps a :class:`VisionAttentionProbe` (``install`` / ``clear`` delegated). :meth:`rows`:
    per sequence, (n,) float32 ``mean_h softmax_j(mean_i q_{h,i} · k_{h,j} · scale)`` (the mean
    over the n rows' queries; context keys in the softmax, not in the result).
    """

    vision = True
    probe: VisionAttentionProbe

    @torch.no_grad()
    def rows(self) -> list[torch.Tensor]:
        """Per sequence, the head-mean attention (n,) of the sequence's mean query."""
        self.probe.checked_inputs()
        out = []
        for q, k in self.probe.query_key():
            query = q.mean(dim=1, keepdim=True, dtype=torch.float32)
            scores = (query @ k.float().transpose(1, 2)) * self.probe.scale
            out.append(scores.softmax(-1).mean(dim=0)[0, :q.shape[1]])
        return out


class VisionQKV(WrapperProbe):
    """Per-sequence queries, keys and values of a vision attention probe (FlowCut-style scores).

    Wraps a :class:`ClipAttentionProbe` (one sequence per batch row) or a
    :class:`QwenVisionAttentionProbe` (packed rows; sequences given by ``bounds`` or, by default,
    the layer's own ``cu_seqlens``); ``install`` / ``clear`` are delegated.
    """

    vision = True
    probe: VisionAttentionProbe

    @property
    def scale(self) -> float:
        """The layer's softmax scale (``1/√d``)."""
        return self.probe.scale

    @torch.no_grad()
    def qkv(
        self, bounds: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sequence: q (H, n, d), k (after any RoPE) and v (H, n + c, d, context rows last),
        in the layer's row order (see :meth:`VisionAttentionProbe.qkv`)."""
        return self.probe.qkv(bounds)


class PatchTokenProbe(Probe):
    """Which language-model image token each pre-merge patch of a vision forward becomes.

    A pre-hook on the vision encoder remembers its ``grid_thw``; ``token_of_patch(grid_thw)``
    (supplied by the adapter, e.g. Qwen's 2×2 merge groups and Qwen2.5-VL's window order) maps
    it to a (P,) LongTensor: for the patch at position p of the encoder's sequence (the order
    vision attention probes see), the index of its merged token among all images' tokens in
    prompt (raster) order.
    """

    vision = True
    grid_thw = ThreadLocal()

    def __init__(
        self, module: nn.Module, token_of_patch: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.module = module
        self._token_of_patch = token_of_patch

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.module.register_forward_pre_hook(self._remember, with_kwargs=True)

    @eager_hook
    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def clear(self) -> None:
        """Drop the reference."""
        self.grid_thw = None

    def token_of_patch(self) -> torch.Tensor:
        """(P,) LongTensor: merged-token index of each patch, in encoder sequence order."""
        if self.grid_thw is None:
            raise RuntimeError("the vision encoder has not run yet in this forward")
        return self._token_of_patch(self.grid_thw)
