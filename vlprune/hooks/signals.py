"""Attention signals without eager attention: recompute only the rows a method asks for.

A probe sits on ONE attention module as a forward pre-hook. It keeps references to that call's
inputs (no copy, no compute) and, when a method asks, recomputes ``softmax(q·kᵀ·scale + mask)``
for the requested query rows only, from the module's own projections and RoPE. The model keeps
running its own backend (sdpa, eager or flash) untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.gather import gather_rows
from vlprune.hooks.text_qk import text_keys, text_queries


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` on the last dim: the rotation used by LLaMA-style RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, L, d) with cos/sin (B, L, r) (M-RoPE sections are already in cos/sin);
    partial rotary (r < d, Qwen3.5) rotates the first r dims and passes the rest."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax in fp32 over the last dim; ``mask`` is bool (True = attend) or additive float."""
    scores = scores.float()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


class ModuleInputProbe:
    """Remembers the first positional (or ``hidden_states``) input of a module in each call,
    e.g. the projector's input: the vision features before projection."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.value: torch.Tensor | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.module.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = args[0] if args else next(iter(kwargs.values()))

    def clear(self) -> None:
        """Drop the reference."""
        self.value = None


class ModuleOutputProbe(ModuleInputProbe):
    """Remembers a module's output (first element if it returns a tuple), e.g. a decoder
    layer's output hidden states."""

    def install(self) -> RemovableHandle:
        """Register the forward hook."""
        return self.module.register_forward_hook(self._remember_output)

    def _remember_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.value = output[0] if isinstance(output, tuple) else output


class TextAttentionProbe:
    """Attention rows of one decoder layer's self-attention, recomputed on request.

    Works for LLaMA (LLaVA, LLaVA-NeXT) and Qwen2-VL / Qwen2.5-VL text attention (GQA, 1-D or
    M-RoPE): both expose ``q_proj``, ``k_proj``, ``head_dim``, ``scaling`` and
    ``num_key_value_groups``, and receive ``position_embeddings=(cos, sin)``.
    """

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.inputs: dict[str, Any] | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook that remembers the layer's inputs."""
        return self.attention.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs = {
            "hidden": hidden,
            "position_embeddings": kwargs["position_embeddings"],
            "attention_mask": kwargs.get("attention_mask"),
        }

    def clear(self) -> None:
        """Drop the references to the last call's inputs."""
        self.inputs = None

    @torch.no_grad()
    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of query rows ``queries`` (B, Q) over all keys.

        Returns (B, H, Q, L) float32, identical (to fp tolerance) to the eager weights of the
        same rows; causal and padding masks are applied as the layer applied them.
        """
        return self.differentiable_rows(queries)

    def differentiable_rows(self, queries: torch.Tensor) -> torch.Tensor:
        """:meth:`rows` with autograd left on, for training losses on attention (e.g. the
        toy model's look-up supervision)."""
        if self.inputs is None:
            raise RuntimeError("the probed layer has not run yet in this forward")
        attn = self.attention
        hidden = self.inputs["hidden"]
        batch, length = hidden.shape[:2]
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in self.inputs["position_embeddings"])
        q = text_queries(attn, gather_rows(hidden, queries))
        k = text_keys(attn, hidden)
        q = apply_rope(q, gather_rows(cos, queries), gather_rows(sin, queries))
        k = apply_rope(k, cos, sin).repeat_interleave(attn.num_key_value_groups, dim=1)
        scores = (q @ k.transpose(2, 3)) * attn.scaling
        return masked_softmax(scores, self._mask_rows(queries, length))

    def _mask_rows(self, queries: torch.Tensor, length: int) -> torch.Tensor:
        mask = self.inputs["attention_mask"] if self.inputs else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = mask.expand(queries.shape[0], *mask.shape[1:])
            index = queries[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
            return mask.gather(2, index)
        keys = torch.arange(length, device=queries.device)
        return (keys[None, None, None, :] <= queries[:, None, :, None])


class VisionAttentionProbe:
    """Attention rows of one vision-encoder layer, recomputed on request.

    A vision forward attends within independent sequences: one per image or crop (CLIP), one
    per image (Qwen full-attention blocks) or per window (Qwen2.5-VL windowed blocks, in window
    order). :meth:`rows` returns one (H, Q, n) tensor per sequence, in the order the layer saw
    them. Subclasses say how to read q and k off the layer.
    """

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.inputs: dict[str, Any] | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook that remembers the layer's inputs."""
        return self.attention.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.inputs = {"hidden": hidden, **rest}

    def clear(self) -> None:
        """Drop the references to the last call's inputs."""
        self.inputs = None

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence: (q, k), each (H, n, d), after any RoPE."""
        raise NotImplementedError

    @torch.no_grad()
    def rows(self, queries: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per sequence, float32 probabilities (H, Q, n) of query rows ``queries`` (local
        indices, e.g. ``[0]`` for CLIP's CLS), or of every row when None."""
        if self.inputs is None:
            raise RuntimeError("the probed vision layer has not run yet in this forward")
        out = []
        for q, k in self.query_key():
            if queries is not None:
                q = q[:, queries.to(q.device)]
            out.append(((q @ k.transpose(1, 2)) * self._scale()).float().softmax(-1))
        return out

    def _scale(self) -> float:
        return float(getattr(self.attention, "scale", getattr(self.attention, "scaling", 1.0)))


class ClipAttentionProbe(VisionAttentionProbe):
    """CLIP (LLaVA, LLaVA-NeXT): ``q_proj`` / ``k_proj``, no RoPE; one sequence per crop."""

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per crop (CLS first): q, k of shape (H, 1 + patches, d)."""
        attn = self.attention
        hidden = self.inputs["hidden"]
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        return list(zip(q, k))


class QwenVisionAttentionProbe(VisionAttentionProbe):
    """Qwen2-VL / Qwen2.5-VL vision blocks: fused ``qkv``, 2-D vision RoPE, ``cu_seqlens``."""

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per ``cu_seqlens`` segment: q, k of shape (H, n, d) after the vision RoPE."""
        attn = self.attention
        hidden = self.inputs["hidden"]
        q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
        cos, sin = (t.unsqueeze(-2).float() for t in self.inputs["position_embeddings"])
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(hidden.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(hidden.dtype)
        bounds = self.inputs["cu_seqlens"].tolist()
        return [
            (q[a:b].transpose(0, 1), k[a:b].transpose(0, 1))
            for a, b in itertools.pairwise(bounds)
        ]


class VisionAttentionScores:
    """Reductions of a vision attention probe that never hold a whole (H, n, n) map at once.

    Wraps a :class:`VisionAttentionProbe` made by the adapter (``install`` / ``clear`` are
    delegated): :meth:`received` gives the attention each key receives from all queries,
    :meth:`logits` the pre-softmax scores of some query rows. One entry per vision sequence, in
    the order of :meth:`VisionAttentionProbe.rows`.
    """

    def __init__(self, probe: VisionAttentionProbe, max_elements: int = 1 << 25) -> None:
        self.probe = probe
        self.max_elements = max_elements

    def install(self) -> RemovableHandle:
        """Install the wrapped probe."""
        return self.probe.install()

    def clear(self) -> None:
        """Clear the wrapped probe."""
        self.probe.clear()

    @torch.no_grad()
    def received(self) -> list[torch.Tensor]:
        """Per sequence, (n,) float32: ``Σ_queries mean_heads softmax(q·kᵀ·scale)``, i.e. the
        column sums of the head-mean attention map; queries run in chunks of at most
        ``max_elements`` probabilities."""
        self._check()
        out = []
        for q, k in self.probe.query_key():
            heads, n = q.shape[:2]
            step = max(1, self.max_elements // (heads * k.shape[1]))
            total = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
            for start in range(0, n, step):
                scores = (q[:, start:start + step] @ k.transpose(1, 2)) * self.probe._scale()
                total += scores.float().softmax(-1).sum(dim=(0, 1))
            out.append(total / heads)
        return out

    @torch.no_grad()
    def logits(self, queries: torch.Tensor) -> list[torch.Tensor]:
        """Per sequence, float32 pre-softmax scores ``q·kᵀ·scale`` (H, Q, n) of query rows
        ``queries`` (local indices, e.g. ``[0]`` for CLIP's CLS)."""
        self._check()
        return [
            ((q[:, queries.to(q.device)] @ k.transpose(1, 2)) * self.probe._scale()).float()
            for q, k in self.probe.query_key()
        ]

    def _check(self) -> None:
        if self.probe.inputs is None:
            raise RuntimeError("the probed vision layer has not run yet in this forward")


class PatchTokenProbe:
    """Which language-model image token each pre-merge patch of a vision forward becomes.

    A pre-hook on the vision encoder remembers its ``grid_thw``; ``token_of_patch(grid_thw)``
    (supplied by the adapter, e.g. Qwen's 2×2 merge groups and Qwen2.5-VL's window order) maps
    it to a (P,) LongTensor: for the patch at position p of the encoder's sequence (the order
    vision attention probes see), the index of its merged token among all images' tokens in
    prompt (raster) order.
    """

    def __init__(
        self, module: nn.Module, token_of_patch: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.module = module
        self._token_of_patch = token_of_patch
        self.grid_thw: torch.Tensor | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.module.register_forward_pre_hook(self._remember, with_kwargs=True)

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


class ModuleKwargProbe:
    """Remembers the keyword input ``name`` of each call of a module (None when absent), e.g.
    the multimodal base model's ``attention_mask``: (B, L), 0 on padding."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.value: Any = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.module.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = kwargs.get(self.name)

    def clear(self) -> None:
        """Drop the reference."""
        self.value = None


class HandleGroup:
    """Several hook handles of one probe, removed together."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()


def transition_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How a sub-module moves each token: its input ``x`` and output ``y`` (B, L, D), before any
    residual add, give ``‖y‖₂ / ‖x‖₂`` and ``cos(x, y)``, each (B, L) float32."""
    x, y = x.float(), y.float()
    ratio = y.norm(dim=-1) / x.norm(dim=-1)
    return ratio, torch.nn.functional.cosine_similarity(x, y, dim=-1)


class TokenTransitionProbe:
    """How one decoder layer's attention and MLP transform each token (TransPrune's TTV).

    Forward hooks on the layer's ``self_attn`` (input: the normed hidden states; output before
    the residual add) and ``mlp`` (same); each call is reduced at once with
    :func:`transition_terms`, so only (B, L) tensors are kept. ``value``:
    ``{"attn": (ratio, cos), "mlp": (ratio, cos)}`` of the last call, over the rows the layer
    saw. Works for LLaMA and Qwen2-VL / Qwen2.5-VL decoder layers.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.value: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def install(self) -> HandleGroup:
        """Register the two forward hooks."""
        return HandleGroup([
            getattr(self.layer, name).register_forward_hook(self._hook(key), with_kwargs=True)
            for key, name in (("attn", "self_attn"), ("mlp", "mlp"))
        ])

    def _hook(self, key: str) -> Callable[[nn.Module, tuple, dict, Any], None]:
        @torch.no_grad()
        def remember(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            y = output[0] if isinstance(output, tuple) else output
            self.value[key] = transition_terms(x, y)

        return remember

    def clear(self) -> None:
        """Drop the last call's values."""
        self.value = {}


class NextLayerAttentionProbe(TextAttentionProbe):
    """Attention rows that decoder layer ``layer`` would compute on the output of ``previous``
    (the layer before it): ``layer``'s ``input_layernorm``, q/k projections and RoPE applied to
    ``previous``'s output, with the position embeddings and mask ``previous`` received. These
    are the rows a decoder cut at ``layer`` sees before it cuts. A forward hook on ``previous``;
    :meth:`rows` as in :class:`TextAttentionProbe`.
    """

    def __init__(self, previous: nn.Module, layer: nn.Module) -> None:
        super().__init__(layer.self_attn)
        self.previous = previous
        self.norm = layer.input_layernorm

    def install(self) -> RemovableHandle:
        """Register the forward hook on ``previous``."""
        return self.previous.register_forward_hook(self._remember_output, with_kwargs=True)

    @torch.no_grad()
    def _remember_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.inputs = {
            "hidden": self.norm(hidden),
            "position_embeddings": kwargs["position_embeddings"],
            "attention_mask": kwargs.get("attention_mask"),
        }


class GlobalQueryAttention:
    """Attention of each vision sequence's mean query: the [CLS] analogue of an encoder without
    one (FlowCut's Qwen2-VL "global query", specs/flowcut_transprune_todre.md §1.4).

    Wraps a :class:`VisionAttentionProbe` (``install`` / ``clear`` delegated). :meth:`rows`:
    per sequence, (n,) float32 ``mean_h softmax_j(mean_i q_{h,i} · k_{h,j} · scale)``.
    """

    def __init__(self, probe: VisionAttentionProbe) -> None:
        self.probe = probe

    def install(self) -> RemovableHandle:
        """Install the wrapped probe."""
        return self.probe.install()

    def clear(self) -> None:
        """Clear the wrapped probe."""
        self.probe.clear()

    @torch.no_grad()
    def rows(self) -> list[torch.Tensor]:
        """Per sequence, the head-mean attention (n,) of the sequence's mean query."""
        if self.probe.inputs is None:
            raise RuntimeError("the probed vision layer has not run yet in this forward")
        out = []
        for q, k in self.probe.query_key():
            query = q.float().mean(dim=1, keepdim=True)
            scores = (query @ k.float().transpose(1, 2)) * self.probe._scale()
            out.append(scores.softmax(-1).mean(dim=0)[0])
        return out


class VisionQKV:
    """Per-sequence queries, keys and values of a vision attention probe (FlowCut-style scores).

    Wraps a :class:`ClipAttentionProbe` (one sequence per batch row) or a
    :class:`QwenVisionAttentionProbe` (packed rows; sequences given by ``bounds`` or, by default,
    the layer's own ``cu_seqlens``); ``install`` / ``clear`` are delegated.
    """

    def __init__(self, probe: VisionAttentionProbe) -> None:
        self.probe = probe

    def install(self) -> RemovableHandle:
        """Install the wrapped probe."""
        return self.probe.install()

    def clear(self) -> None:
        """Clear the wrapped probe."""
        self.probe.clear()

    @property
    def scale(self) -> float:
        """The layer's softmax scale (``1/√d``)."""
        return self.probe._scale()

    @torch.no_grad()
    def qkv(
        self, bounds: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sequence: q, k (after any RoPE) and v, each (H, n, d), in the layer's row order.

        ``bounds`` (cumulative row boundaries, e.g. one sequence per image) splits packed rows;
        batched (CLIP) rows are their own sequences and take no ``bounds``.
        """
        inputs = self.probe.inputs
        if inputs is None:
            raise RuntimeError("the probed vision layer has not run yet in this forward")
        attn = self.probe.attention
        hidden = inputs["hidden"]
        if isinstance(self.probe, QwenVisionAttentionProbe):
            rows = hidden.shape[0]
            q, k, v = attn.qkv(hidden).reshape(rows, 3, attn.num_heads, -1).unbind(1)
            cos, sin = (t.unsqueeze(-2).float() for t in inputs["position_embeddings"])
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(hidden.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(hidden.dtype)
            cuts = bounds if bounds is not None else inputs["cu_seqlens"].tolist()
            spans = [slice(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]
            return [tuple(x[s].transpose(0, 1) for x in (q, k, v)) for s in spans]
        if bounds is not None:
            raise ValueError("batched vision rows are their own sequences; pass no bounds")
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q, k, v = (proj(hidden).view(shape).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        return list(zip(q, k, v))


class TextQKV:
    """Pre-softmax attention logits of some query rows and the values of one decoder layer.

    Wraps a :class:`TextAttentionProbe` (``install`` / ``clear`` delegated). Values stay per
    key-value head (GQA): a mean over query heads equals the mean over key-value heads.
    """

    def __init__(self, probe: TextAttentionProbe) -> None:
        self.probe = probe

    def install(self) -> RemovableHandle:
        """Install the wrapped probe."""
        return self.probe.install()

    def clear(self) -> None:
        """Clear the wrapped probe."""
        self.probe.clear()

    @property
    def scale(self) -> float:
        """The layer's softmax scale (``1/√d``)."""
        return float(self.probe.attention.scaling)

    def _inputs(self) -> dict[str, Any]:
        if self.probe.inputs is None:
            raise RuntimeError("the probed layer has not run yet in this forward")
        return self.probe.inputs

    @torch.no_grad()
    def logits(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, L) float32 ``q·kᵀ·scale`` after RoPE of query rows ``queries`` (B, Q),
        without any mask."""
        inputs = self._inputs()
        attn = self.probe.attention
        hidden = inputs["hidden"]
        batch = hidden.shape[0]
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in inputs["position_embeddings"])
        q = text_queries(attn, gather_rows(hidden, queries))
        k = text_keys(attn, hidden)
        q = apply_rope(q, gather_rows(cos, queries), gather_rows(sin, queries))
        k = apply_rope(k, cos, sin).repeat_interleave(attn.num_key_value_groups, dim=1)
        return ((q @ k.transpose(2, 3)) * attn.scaling).float()

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        """(B, H_kv, L, d) value vectors of every row."""
        inputs = self._inputs()
        attn = self.probe.attention
        hidden = inputs["hidden"]
        return attn.v_proj(hidden).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
