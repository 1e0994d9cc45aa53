"""FLOPs of a (pruned) VLM run, three ways (README: "Profiling: FLOPs, latency, memory").

1. **Paper-compatible** (:func:`paper_macs`): the FastV per-layer formula
   ``4·n·d² + 2·n²·d + 2·n·d·m`` summed over the decoder layers with each layer's own token
   count ``n``. It counts **multiply-accumulates** of the LLM prefill only (MHA, 2-matrix FFN,
   full n² attention), as the papers' tables do.
2. **Exact analytic** (:func:`exact_flops`): real FLOPs (2 per MAC) of every matrix product:
   GQA projections, the gated 3-matrix MLP (sparse MoE: the router and the active experts
   only), causal attention (``n(n+1)/2`` query-key pairs), the vision encoder (per crop / per
   image / per window, with any encoder-internal pruning), projector or merger (Qwen3-VL: plus
   one DeepStack merger per DeepStack layer, on the rows alive there), LM head, and decode
   steps with the (pruned) KV cache; prefill and decode separately. Element-wise work (norms,
   activations, softmax, RoPE, residuals, the DeepStack additions to the hidden states) is
   left out, as in the papers' tables and in ``FlopCounterMode``.
3. **Counted** (:func:`count_flops`): ``torch.utils.flop_counter.FlopCounterMode`` on a real
   forward, with one sdpa formula for every sdpa kernel (torch counts CPU sdpa as 0) and one
   for the grouped expert matmul of MoE layers (also counted as 0 by torch). The sdpa formula
   charges the full n² scores, like torch's own and eager attention, so counted numbers match
   ``exact_flops(..., causal=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from vlprune.eval.profiler.presets import ImageGeometry

__all__ = [
    "Arch",
    "FlopsBreakdown",
    "RunTokens",
    "TextArch",
    "VisionArch",
    "arch_from_config",
    "count_flops",
    "deepstack_rows",
    "exact_flops",
    "paper_macs",
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


@dataclass(frozen=True)
class Arch:
    """What the analytic count needs of a model: its family, text and vision sizes."""

    family: str
    text: TextArch
    vision: VisionArch


def _text_arch(text: PretrainedConfig) -> TextArch:
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate, router = text.intermediate_size, 0
    experts = getattr(text, "num_experts", 0) or 0
    if experts:
        dense = getattr(text, "mlp_only_layers", None) or []
        if dense or getattr(text, "decoder_sparse_step", 1) != 1:
            raise ValueError("the analytic count needs every decoder layer to be sparse MoE")
        intermediate = text.num_experts_per_tok * text.moe_intermediate_size
        router = experts
    return TextArch(layers=text.num_hidden_layers, hidden=text.hidden_size,
                    q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                    intermediate=intermediate, vocab=text.vocab_size, router=router)


def arch_from_config(config: PretrainedConfig, family: str) -> Arch:
    """Sizes of a config of a supported family (LLaVA, NeXT, OneVision, Qwen2/2.5/3-VL);
    ``NotImplementedError`` for hybrid decoders (Qwen3.5's linear-attention layers are not
    modelled)."""
    if "linear_attention" in (getattr(config.get_text_config(), "layer_types", None) or ()):
        raise NotImplementedError(
            f"the FLOPs profiler does not model the linear-attention layers of {family} models"
        )
    text = _text_arch(config.text_config)
    v = config.vision_config
    if family in ("llava", "llava_next", "llava_onevision"):
        layers = config.vision_feature_layer
        n_feat = 1 if isinstance(layers, int) else len(layers)
        projector = ((v.hidden_size * n_feat, text.hidden), (text.hidden, text.hidden))
        kind = "siglip" if family == "llava_onevision" else "clip"
        vision = VisionArch(kind, v.num_hidden_layers, v.hidden_size, v.intermediate_size, 2,
                            patch_in=v.num_channels * v.patch_size ** 2, merge=1,
                            projector=projector)
        return Arch(family, text, vision)
    merge = v.spatial_merge_size ** 2
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    window, full, deepstack, kind = 0, (), (), family
    if family == "qwen2_vl":
        width, inter, mats, out = v.embed_dim, v.embed_dim * v.mlp_ratio, 2, v.hidden_size
    elif family == "qwen2_5_vl":
        width, inter, mats, out = v.hidden_size, v.intermediate_size, 3, v.out_hidden_size
        window = v.window_size // v.spatial_merge_size // v.patch_size
        full = tuple(v.fullatt_block_indexes)
    else:  # Qwen3-VL (dense or MoE text): full attention, 2-matrix MLP, DeepStack mergers
        width, inter, mats, out = v.hidden_size, v.intermediate_size, 2, v.out_hidden_size
        deepstack, kind = tuple(getattr(v, "deepstack_visual_indexes", ())), "qwen3_vl"
    projector = ((width * merge, width * merge), (width * merge, out))
    vision = VisionArch(kind, v.depth, width, inter, mats, patch_in, merge, projector,
                        window, full, v.spatial_merge_size, deepstack)
    return Arch(family, text, vision)


@dataclass
class RunTokens:
    """Token counts of one sample's prefill.

    ``layer_tokens[l]``: sequence length entering decoder layer l; ``images``: geometry of each
    image; ``vision_layer_tokens[i][l]``: tokens of image i (all its crops, CLS included)
    entering vision layer l, empty when nothing is cut inside the encoder;
    ``projector_rows``: feature rows the projector / merger received when observed (None:
    derived from the other counts, see :func:`projector_rows`).
    """

    layer_tokens: list[int]
    images: list[ImageGeometry]
    vision_layer_tokens: list[list[int]] = field(default_factory=list)
    projector_rows: int | None = None


@dataclass
class FlopsBreakdown:
    """FLOPs of one run (all samples); ``decode`` covers ``new_tokens - 1`` cached steps."""

    vision: float
    projector: float
    llm: float
    lm_head: float
    decode: float
    new_tokens: int

    @property
    def prefill(self) -> float:
        """Vision + projector + decoder layers + LM head of the prefill."""
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def decode_per_token(self) -> float:
        """Mean FLOPs of one decode step (0 when only the prefill token is generated)."""
        steps = self.new_tokens - 1
        return self.decode / steps if steps > 0 else 0.0

    @property
    def total(self) -> float:
        """Prefill plus decode."""
        return self.prefill + self.decode

    def as_dict(self) -> dict[str, float]:
        """Plain-dict view, parts and sums."""
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm,
                "lm_head": self.lm_head, "prefill": self.prefill, "decode": self.decode,
                "decode_per_token": self.decode_per_token, "total": self.total}


def paper_macs(layer_tokens: Sequence[int], hidden: int, intermediate: int) -> float:
    """FastV's formula in MACs: Σ_l 4·n_l·d² + 2·n_l²·d + 2·n_l·d·m (LLM prefill only)."""
    d, m = hidden, intermediate
    return float(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in layer_tokens))


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


def exact_flops(arch: Arch, run: RunTokens, *, new_tokens: int = 1, causal: bool = True,
                lm_head_tokens: int = 1) -> FlopsBreakdown:
    """Exact analytic FLOPs of one sample: prefill (vision, projector, decoder layers, LM head
    on ``lm_head_tokens`` rows) and ``new_tokens - 1`` decode steps with the pruned KV cache
    (layer l caches ``layer_tokens[l]`` prompt tokens)."""
    t = arch.text
    vision = 0.0
    rows = 0
    side = 0.0
    for i, image in enumerate(run.images):
        cut = run.vision_layer_tokens[i] if i < len(run.vision_layer_tokens) else ()
        vision += vision_flops(arch.vision, image, layer_tokens=cut)
        rows += projector_rows(arch.vision, image, cut)
        side += sum(projector_flops(arch.vision, n)
                    for n in deepstack_rows(arch.vision, image, cut))
    if run.projector_rows is not None:
        rows = run.projector_rows
    llm = sum(text_layer_flops(t, n, n, causal) for n in run.layer_tokens)
    head = 2.0 * t.hidden * t.vocab
    decode = 0.0
    for step in range(1, new_tokens):
        decode += sum(text_layer_flops(t, 1, n + step, causal) for n in run.layer_tokens) + head
    return FlopsBreakdown(vision, projector_flops(arch.vision, rows) + side, llm,
                          head * lm_head_tokens, decode, new_tokens)


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                out_shape: Any = None, **kwargs: Any) -> int:
    """Scores and weighted sum over the full n² pairs, query heads counted (GQA-aware: torch
    before 2.12 rejects fewer key/value heads than query heads)."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None,
                      **kwargs: Any) -> int:
    """``aten._grouped_mm`` (MoE experts, each row times its own expert): 2·rows·K·N."""
    return 2 * math.prod(out_shape) * a_shape[-1]


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts every sdpa kernel (CPU sdpa, which torch counts as 0,
    included) with one GQA-aware rule, and grouped expert matmuls (local mapping, nothing
    global)."""
    mapping = {getattr(torch.ops.aten, op): _sdpa_flops for op in _SDPA_OPS
               if hasattr(torch.ops.aten, op)}
    mapping[torch.ops.aten._grouped_mm] = _grouped_mm_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(FLOPs counted by ``FlopCounterMode`` while ``fn()`` runs, its result)."""
    with flop_counter() as counter:
        result = fn()
    return float(counter.get_total_flops()), result
