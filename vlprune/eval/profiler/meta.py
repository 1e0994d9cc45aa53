"""Counted FLOPs of full-size models on the ``meta`` device: shapes only, no weights allocated.

A whole VLM forward cannot run on ``meta`` (placeholder checks, M-RoPE indices and the
selection itself read tensor values), so the model's own modules are run one by one, each on
meta inputs of the size the run gave it, under ``FlopCounterMode``: the patch embedding, every
vision layer (per crop / image / window), the projector or merger (and Qwen3-VL's DeepStack
mergers), each decoder layer at its prefill length, the LM head, and each decode step's decoder
layer with a cache of the pruned length. What is measured is the modules' real op-level FLOPs;
the token counts come from a run of the method (``RunTokens``). Attention is counted over the
full n² scores, like ``exact_flops(..., causal=False)``. MoE experts run with transformers'
``batched_mm`` implementation on meta (its grouped kernel has no float32 path there); both
multiply each token by its active experts only.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from vlprune.adapters import get_adapter
from vlprune.compat import call_cache
from vlprune.eval.profiler.flops import (
    FlopsBreakdown,
    RunTokens,
    arch_from_config,
    deepstack_rows,
    flop_counter,
    projector_rows,
    qwen_window_sizes,
)
from vlprune.eval.profiler.presets import ImageGeometry

__all__ = ["MetaCounter"]


class MetaCounter:
    """Counts the modules of one ``meta``-device model; equal-shaped calls are counted once."""

    def __init__(self, model: nn.Module, family: str) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.arch = arch_from_config(model.config, family)
        self._memo: dict[tuple, float] = {}
        if self.arch.text.router:
            model.config.text_config._experts_implementation = "batched_mm"

    def _count(self, key: tuple, fn: Callable[[], Any]) -> float:
        if key not in self._memo:
            with torch.no_grad(), flop_counter() as counter:
                fn()
            self._memo[key] = float(counter.get_total_flops())
        return self._memo[key]

    def _clip_image(self, image: ImageGeometry, layer_tokens: list[int]) -> float:
        v, adapter = self.arch.vision, self.adapter
        size = self.model.config.vision_config.image_size
        flops = self._count(("patch", image.crops), lambda: adapter.vision_tower.embeddings
                            .patch_embedding(_meta(image.crops, 3, size, size)))
        full = image.crop_patches + (1 if v.kind == "clip" else 0)
        layer = adapter.vision_layers[0]
        for i in range(v.layers):
            n = round(layer_tokens[i] / image.crops) if layer_tokens else full
            flops += self._count(("clip", image.crops, n), lambda n=n: layer(
                _meta(image.crops, n, v.hidden), attention_mask=None))
        return flops

    def _qwen_image(self, image: ImageGeometry, layer_tokens: list[int]) -> float:
        v, visual = self.arch.vision, self.model.model.visual
        t, h, w = image.grid_thw
        patches = t * h * w
        flops = self._count(("patch", patches), lambda: visual.patch_embed(
            _meta(patches, v.patch_in)))
        full = [h * w] * t
        windows = qwen_window_sizes(image.grid_thw, v.window, v.merge_side) if v.window else []
        head_dim = v.hidden // self.model.config.vision_config.num_heads
        block = visual.blocks[0]  # all blocks have the same sizes; only cu_seqlens differ
        for i in range(v.layers):
            n = layer_tokens[i] if layer_tokens else patches
            segs = windows if windows and i not in v.full_blocks else full
            segs = [s for s in _split(n, segs) if s > 0]
            cu_seqlens = torch.tensor([0, *itertools.accumulate(segs)])
            flops += self._count(("block", tuple(segs)), lambda n=n, cu=cu_seqlens: block(
                _meta(n, v.hidden), cu_seqlens=cu,
                position_embeddings=(_meta(n, head_dim), _meta(n, head_dim))))
        return flops

    def _projector(self, rows: int, merger: nn.Module | None = None) -> float:
        """The projector (LLaVA) or patch merger (Qwen; ``merger``: a DeepStack one) on
        ``rows`` feature rows."""
        width = self.arch.vision.projector[0][0] // self.arch.vision.merge
        module = self.adapter.projector if merger is None else merger
        key = ("projector" if merger is None else "deepstack", rows)
        return self._count(key, lambda: module(_meta(rows, width)))

    def _decoder_layer(self, queries: int, cached: int) -> float:
        """Decoder layer 0 on ``queries`` new tokens over ``cached`` cached ones."""
        layer = self.adapter.decoder_layers[0]
        head_dim = layer.self_attn.head_dim
        text = self.model.config.text_config

        def run() -> None:
            cache = None
            if cached:
                cache = DynamicCache(config=self.model.config)
                kv = _meta(1, text.num_key_value_heads, cached, head_dim)
                cache.update(kv, kv, 0)
            rope = (_meta(1, queries, head_dim), _meta(1, queries, head_dim))
            layer(_meta(1, queries, text.hidden_size), attention_mask=None,
                  position_embeddings=rope, **call_cache(cache), use_cache=cache is not None)

        return self._count(("decoder", queries, cached), run)

    def count(self, run: RunTokens, *, new_tokens: int = 1) -> FlopsBreakdown:
        """Counted FLOPs of one sample of ``run`` (see module doc); the LM head runs on the
        last prompt token, as in ``generate``."""
        batched = self.arch.vision.kind in ("clip", "siglip")
        per_image = self._clip_image if batched else self._qwen_image
        vision, rows, side = 0.0, 0, 0.0
        mergers = self.adapter.deepstack_mergers
        for i, image in enumerate(run.images):
            cut = run.vision_layer_tokens[i] if i < len(run.vision_layer_tokens) else []
            vision += per_image(image, list(cut))
            rows += projector_rows(self.arch.vision, image, cut)
            for merger, n in zip(mergers, deepstack_rows(self.arch.vision, image, cut)):
                side += self._projector(n, merger)
        if run.projector_rows is not None:
            rows = run.projector_rows
        projector = self._projector(rows) + side
        counts = Counter(run.layer_tokens)
        llm = sum(k * self._decoder_layer(n, 0) for n, k in counts.items())
        hidden = self.arch.text.hidden
        head = self._count(("head",), lambda: self.model.lm_head(_meta(1, 1, hidden)))
        decode = 0.0
        for step in range(1, new_tokens):
            counts = Counter(n + step - 1 for n in run.layer_tokens)
            decode += sum(k * self._decoder_layer(1, n) for n, k in counts.items()) + head
        return FlopsBreakdown(vision, projector, llm, head, decode, new_tokens)


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` spread over segments in proportion to ``parts`` (integers summing to total)."""
    full = sum(parts)
    cuts = [round(total * sum(parts[: i + 1]) / full) for i in range(len(parts))]
    return [b - a for a, b in zip([0, *cuts[:-1]], cuts)]
