"""Language-model signals: decoder attention rows, values and token transitions.

A probe sits on one decoder layer's attention as hooks: it keeps references to that call's inputs
and to the outputs of its q / k (/ v) projections, so when a method asks for
``softmax(q·kᵀ·scale + mask)`` of some query rows only RoPE and the product of those rows are
computed (nothing is projected twice). A probe of the rows a layer *would* see before a cut
(:class:`NextLayerAttentionProbe`) projects them itself. The model keeps running its own backend
(sdpa, eager or flash) untouched.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.compat import layer_cache
from vlprune.hooks.gather import gather_rows
from vlprune.hooks.masks import query_rows
from vlprune.hooks.signals.module_probes import HandleGroup, Probe, ProjectionOutputs, WrapperProbe
from vlprune.hooks.signals.recompute import apply_rope, masked_softmax
from vlprune.hooks.signals.text_qk import text_keys, text_queries
from vlprune.hooks.state import ThreadLocal, eager_hook, physical_length


class TextAttentionProbe(Probe):
    """Attention rows of one decoder layer's self-attention, recomputed on request.

    Works for LLaMA (LLaVA, LLaVA-NeXT), Qwen2 (Qwen2-VL / 2.5-VL, LLaVA-OneVision) and Qwen3
    (Qwen3-VL, Qwen3.5 full-attention layers) text attention (GQA, 1-D or M-RoPE, q/k norms,
    gated queries, partial rotary; :mod:`~vlprune.hooks.signals.text_qk`): all expose ``q_proj``,
    ``k_proj``, ``head_dim``, ``scaling`` and ``num_key_value_groups``, and receive
    ``position_embeddings=(cos, sin)``. The outputs of ``projections`` are kept from the layer's
    own call (``kept``).
    """

    projections: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj")
    inputs = ThreadLocal()

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.kept = ProjectionOutputs(attention, self.projections)

    def install(self) -> HandleGroup:
        """Register the pre-hook that remembers the layer's inputs and the hooks that keep the
        outputs of its q and k projections."""
        remember = self.attention.register_forward_pre_hook(self._remember, with_kwargs=True)
        return HandleGroup([remember, self.kept.install()])

    @eager_hook
    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs = {
            "hidden": hidden,
            "position_embeddings": kwargs["position_embeddings"],
            "attention_mask": kwargs.get("attention_mask"),
        }

    def clear(self) -> None:
        """Drop the references to the last call's inputs and projections."""
        self.inputs = None
        self.kept.clear()

    def checked_inputs(self) -> dict[str, Any]:
        """The last call's inputs; ``RuntimeError`` if the layer has not run."""
        if self.inputs is None:
            raise RuntimeError("the probed layer has not run yet in this forward")
        return self.inputs

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
        length = self.checked_inputs()["hidden"].shape[1]
        return masked_softmax(self.scores(queries), self._mask_rows(queries, length))

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, L) ``q·kᵀ·scale`` after RoPE of query rows ``queries`` (B, Q), without any
        mask (autograd left on)."""
        inputs = self.checked_inputs()
        attn = self.attention
        batch = inputs["hidden"].shape[0]
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in inputs["position_embeddings"])
        q = text_queries(attn, self.projection("q_proj", queries))
        k = text_keys(attn, self.projection("k_proj"))
        q = apply_rope(q, gather_rows(cos, queries), gather_rows(sin, queries))
        k = apply_rope(k, cos, sin).repeat_interleave(attn.num_key_value_groups, dim=1)
        return (q @ k.transpose(2, 3)) * attn.scaling

    def projection(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, out) output of projection ``name`` at rows ``rows`` (B, R) (None: every row):
        the layer's own, kept from its last call, or projected here where none was kept (a
        compiled model does not run hooks on its projections)."""
        out = self.kept.get(name)
        if out is None:
            hidden = self.checked_inputs()["hidden"]
            project = getattr(self.attention, name)
            return project(hidden if rows is None else gather_rows(hidden, rows))
        return out if rows is None else gather_rows(out, rows)

    def _mask_rows(self, queries: torch.Tensor, length: int) -> torch.Tensor:
        mask = self.inputs["attention_mask"] if self.inputs else None
        return query_rows(mask, queries, length)


class NextLayerAttentionProbe(TextAttentionProbe):
    """Attention rows that decoder layer ``layer`` would compute on the output of ``previous``
    (the layer before it): ``layer``'s ``input_layernorm``, q/k projections and RoPE applied to
    ``previous``'s output, with the position embeddings and mask ``previous`` received. These
    are the rows a decoder cut at ``layer`` sees before it cuts (``layer`` itself only sees the
    rows that survive, so they are projected here, on request). A forward hook on ``previous``;
    :meth:`rows` as in :class:`TextAttentionProbe`.
    """

    def __init__(self, previous: nn.Module, layer: nn.Module) -> None:
        super().__init__(layer.self_attn)
        self.previous = previous
        self.norm = layer.input_layernorm

    def install(self) -> RemovableHandle:
        """Register the forward hook on ``previous``."""
        return self.previous.register_forward_hook(self._remember_output, with_kwargs=True)

    @eager_hook
    def _remember_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.inputs = {
            "output": output[0] if isinstance(output, tuple) else output,
            "position_embeddings": kwargs["position_embeddings"],
            "attention_mask": kwargs.get("attention_mask"),
        }

    def checked_inputs(self) -> dict[str, Any]:
        """The last call's inputs, ``hidden`` (``layer``'s normed input) computed on first use."""
        inputs = super().checked_inputs()
        if "hidden" not in inputs:
            with torch.no_grad():
                inputs["hidden"] = self.norm(inputs["output"])
        return inputs


class TextQKV(WrapperProbe):
    """Pre-softmax attention logits of some query rows and the values of one decoder layer.

    Wraps a :class:`TextAttentionProbe` (``install`` / ``clear`` delegated). Values stay per
    key-value head (GQA): a mean over query heads equals the mean over key-value heads.
    """

    probe: TextAttentionProbe

    def install(self) -> HandleGroup:
        """Install the wrapped probe, keeping the value projection's output too."""
        return HandleGroup([self.probe.install(), self.probe.kept.keep("v_proj")])

    @property
    def scale(self) -> float:
        """The layer's softmax scale (``1/√d``)."""
        return float(self.probe.attention.scaling)

    @torch.no_grad()
    def logits(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, L) float32 ``q·kᵀ·scale`` after RoPE of query rows ``queries`` (B, Q),
        without any mask."""
        return self.probe.scores(queries).float()

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        """(B, H_kv, L, d) value vectors of every row."""
        hidden = self.probe.checked_inputs()["hidden"]
        values = self.probe.projection("v_proj")
        return values.view(*hidden.shape[:2], -1, self.probe.attention.head_dim).transpose(1, 2)


def transition_terms(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """How a sub-module moves each token: its input ``x`` and output ``y`` (B, L, D), before any
    residual add, give ``‖y‖₂ / ‖x‖₂`` and ``cos(x, y)``, each (B, L) float32.

    The cosine is ``torch.nn.functional.cosine_similarity``'s arithmetic (rows divided by their
    norms clamped at ``eps``, then the product summed), on float32 copies with each norm
    computed once."""
    x, y = x.to(torch.float32, copy=True), y.to(torch.float32, copy=True)
    norm_x, norm_y = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
    ratio = (norm_y / norm_x)[..., 0]
    x.div_(norm_x.clamp_min(eps)).mul_(y.div_(norm_y.clamp_min(eps)))
    return ratio, x.sum(-1)


class TokenTransitionProbe(Probe):
    """How one decoder layer's attention and MLP transform each token (TransPrune's TTV).

    Forward hooks on the layer's ``self_attn`` (input: the normed hidden states; output before
    the residual add) and ``mlp`` (same); each call is reduced at once with
    :func:`transition_terms`, so only (B, L) tensors are kept. ``value``:
    ``{"attn": (ratio, cos), "mlp": (ratio, cos)}`` of the last call, over the rows the layer
    saw (empty before it ran). A decode step (the layer's cache already holds rows) is not
    reduced: only a prefill's terms are ever read.
    """

    work = ("reduce",)
    _value = ThreadLocal()
    _decoding = ThreadLocal(False)

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.layer_idx = getattr(getattr(layer, "self_attn", None), "layer_idx", None)

    @property
    def value(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The last call's terms in this thread."""
        return self._value or {}

    def install(self) -> HandleGroup:
        """Register the layer's pre-hook (prefill or decode step) and the two forward hooks."""
        return HandleGroup([
            self.layer.register_forward_pre_hook(self._start, with_kwargs=True),
            *(getattr(self.layer, name).register_forward_hook(
                partial(self._remember, key), with_kwargs=True
            ) for key, name in (("attn", "self_attn"), ("mlp", "mlp"))),
        ])

    @eager_hook
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = layer_cache(kwargs)
        self._decoding = (cache is not None and self.layer_idx is not None
                          and physical_length(cache, self.layer_idx) > 0)

    @eager_hook
    @torch.no_grad()
    def _remember(self, key: str, module: nn.Module, args: tuple, kwargs: dict,
                  output: Any) -> None:
        if self._decoding:
            return
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        y = output[0] if isinstance(output, tuple) else output
        self._value = {**self.value, key: self.reduce(x, y)}

    def reduce(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sub-module call's :func:`transition_terms`."""
        return transition_terms(x, y)

    def clear(self) -> None:
        """Drop the last call's values."""
        self._value = None
