"""Analytic FLOPs of the parts of a VLM: the terms that
:func:`~vlprune.eval.profiler.flops.exact_flops` sums.

One decoder layer (GQA projections, gated or sparse-MoE MLP, causal or full attention over a KV
cache), one image's vision encoder (per crop / per image / per window, with any
encoder-internal pruning), the projector / merger and Qwen3-VL's DeepStack mergers, and the
sizes they take (:class:`TextArch`, :class:`VisionArch`). Real FLOPs (2 per multiply-accumulate)
of matrix products only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlprune.eval.profiler.presets import ImageGeometry

__all__ = [
    "TextArch",
    "VisionArch",
    "deepstack_rows",
    "projector_flops",
    "projector_rows",
    "qwen_window_sizes",
    "text_layer_flops",
    "vision_flops",
]


@dataclass(frozen=True)
class TextArch:
    """Decoder sizes: ``q_dim`` = heads·head_dim, ``kv_dim`` = KV heads·head_dim,
    ``mlp_mats`` = 3 for gated (SwiGLU) MLPs. Sparse MoE: ``intermediate`` is the active width
    (experts per token · expert MLP width) and ``router`` the number of experts (the router's
    output width); 0 for dense MLPs."""

    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    mlp_mats: int = 3
    router: int = 0


@dataclass(frozen=True)
class VisionArch:
    """Vision tower sizes.

    ``kind``: "clip" (LLaVA / NeXT, one CLS + patches per crop), "siglip" (LLaVA-OneVision,
    patches per crop, no CLS), "qwen2_vl", "qwen2_5_vl" or "qwen3_vl";
    ``patch_in``: input values per patch (3·p² or 3·t·p²); ``merge``: patches per LLM token;
    ``projector``: (in, out) of each projector / merger linear, applied to every LLM token;
    ``window``: Qwen2.5-VL window side in merged tokens (0: none); ``full_blocks``: blocks with
    full attention when windowed; ``deepstack``: Qwen3-VL layers whose output also feeds a
    DeepStack merger of the projector's shape.
    """

    kind: str
    layers: int
    hidden: int
    intermediate: int
    mlp_mats: int
    patch_in: int
    merge: int
    projector: tuple[tuple[int, int], ...]
    window: int = 0
    full_blocks: tuple[int, ...] = ()
    merge_side: int = 1
    deepstack: tuple[int, ...] = ()


def _attention_pairs(queries: int, keys: int, causal: bool) -> int:
    """Query-key pairs when the ``queries`` newest of ``keys`` tokens attend."""
    older = queries * (keys - queries)
    return older + (queries * (queries + 1) // 2 if causal else queries * queries)


def text_layer_flops(t: TextArch, queries: int, keys: int, causal: bool = True) -> float:
    """One decoder layer on ``queries`` new tokens attending over ``keys`` (cache + new)."""
    proj = 2 * queries * t.hidden * (2 * t.q_dim + 2 * t.kv_dim)
    mlp = 2 * queries * t.hidden * (t.intermediate * t.mlp_mats + t.router)
    attn = 4 * t.q_dim * _attention_pairs(queries, keys, causal)
    return float(proj + mlp + attn)


def qwen_window_sizes(grid_thw: tuple[int, int, int], window: int, merge_side: int) -> list[int]:
    """Patches per attention window of Qwen2.5-VL (as ``get_vision_window_index``)."""
    t, h, w = grid_thw
    rows, cols = h // merge_side, w // merge_side

    def spans(n: int) -> list[int]:
        return [min(window, n - start) for start in range(0, n, window)]

    unit = merge_side * merge_side
    return [r * c * unit for _ in range(t) for r in spans(rows) for c in spans(cols)]


def _vision_sequences(v: VisionArch, image: ImageGeometry) -> tuple[int, list[int], list[int]]:
    """(patches, full-attention sequence lengths, windowed sequence lengths) of one image."""
    if v.kind in ("clip", "siglip"):
        cls = 1 if v.kind == "clip" else 0
        return image.crops * image.crop_patches, [image.crop_patches + cls] * image.crops, []
    t, h, w = image.grid_thw
    full = [h * w] * t
    windows = qwen_window_sizes(image.grid_thw, v.window, v.merge_side) if v.window else []
    return t * h * w, full, windows


def vision_flops(v: VisionArch, image: ImageGeometry, *,
                 layer_tokens: Sequence[int] = ()) -> float:
    """Encoder FLOPs of one image (patch embedding and layers); ``layer_tokens`` as in
    ``RunTokens``. With encoder-internal pruning, layer l's tokens are spread over the image's
    sequences (crops / windows) in proportion to their unpruned sizes."""
    patches, full, windows = _vision_sequences(v, image)
    n_full = sum(full)
    total = 2.0 * patches * v.patch_in * v.hidden
    for layer in range(v.layers):
        n = layer_tokens[layer] if layer_tokens else n_full
        scale = n / n_full
        use_windows = windows and layer not in v.full_blocks
        segs = [s * scale for s in (windows if use_windows else full)]
        total += 2 * n * v.hidden * 4 * v.hidden
        total += 2 * n * v.hidden * v.intermediate * v.mlp_mats
        total += 4 * v.hidden * sum(s * s for s in segs)
    return total


def projector_rows(v: VisionArch, image: ImageGeometry, layer_tokens: Sequence[int] = ()) -> int:
    """Feature rows one image sends into the projector / merger (CLS dropped, before the 2x2
    merge): all of them, or the rows entering the last vision layer when the encoder is cut."""
    if not layer_tokens:
        return _vision_sequences(v, image)[0]
    return layer_tokens[-1] - (image.crops if v.kind == "clip" else 0)


def projector_flops(v: VisionArch, rows: float) -> float:
    """Projector / merger FLOPs for ``rows`` feature rows (``rows / merge`` LLM tokens)."""
    return sum(2.0 * rows / v.merge * i * o for i, o in v.projector)


def deepstack_rows(v: VisionArch, image: ImageGeometry, layer_tokens: Sequence[int] = ()
                   ) -> list[int]:
    """Rows each DeepStack merger of one image receives: the output rows of its vision layer
    (all patches, or the rows entering the next layer when the encoder is cut)."""
    patches = _vision_sequences(v, image)[0]
    if not layer_tokens:
        return [patches for _ in v.deepstack]
    last = projector_rows(v, image, layer_tokens)
    return [layer_tokens[i + 1] if i + 1 < len(layer_tokens) else last for i in v.deepstack]
