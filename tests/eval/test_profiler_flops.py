"""FLOPs of the profiler: the paper formula, the exact analytic count, and both cross-checked
against ``FlopCounterMode`` (real forwards of tiny models, full-size modules on ``meta``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import vlprune
from tests.helpers import method_families
from vlprune.eval.profiler.flops import (
    RunTokens,
    TextArch,
    arch_from_config,
    count_flops,
    exact_flops,
    paper_macs,
    projector_flops,
    qwen_window_sizes,
    text_layer_flops,
)
from vlprune.eval.profiler.meta import MetaCounter
from vlprune.eval.profiler.presets import (
    PRESETS,
    build_preset_model,
    image_geometry,
    synthetic_inputs,
)
from vlprune.eval.profiler.timing import SelectionMeter
from vlprune.testing import DEFAULT_IMAGE_SIZE, FAMILIES, tiny_config, tiny_model

# Agreement required between analytic and counted FLOPs (they agree exactly in practice).
REL_TOL = 1e-3
FULL_PRESETS = [name for name, preset in PRESETS.items() if not preset.mini]


def _profiled(family: str) -> bool:
    """The profiler models this family (hybrid decoders are refused, tested below)."""
    try:
        arch_from_config(tiny_config(family), family)
    except NotImplementedError:
        return False
    return True


PROFILED = [family for family in FAMILIES if _profiled(family)]
PROFILED_PAIRS = [(method, family) for method, family in method_families() if family in PROFILED]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """FLOP counts do not depend on threads; one thread keeps these runs fast on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_paper_formula_matches_reference_table() -> None:
    """LLaVA-1.5-7B (d 4096, m 11008, 32 layers), 64 text tokens: the spec's table (§7.1)
    gives 3.33 / 1.31 / 0.98 / 0.65 T MACs for 576 / 192 / 128 / 64 image tokens."""
    expected = {576: 3.33, 192: 1.31, 128: 0.98, 64: 0.65}
    for image_tokens, tmacs in expected.items():
        macs = paper_macs([image_tokens + 64] * 32, 4096, 11008)
        assert round(macs / 1e12, 2) == tmacs


def test_paper_formula_integrates_per_layer_counts() -> None:
    """FastV K=2 keeping 64 of 576: 2 layers at 640 tokens + 30 layers at 128."""
    per_layer = [640] * 2 + [128] * 30
    full, pruned = paper_macs([640], 4096, 11008), paper_macs([128], 4096, 11008)
    assert paper_macs(per_layer, 4096, 11008) == pytest.approx(2 * full + 30 * pruned)


def test_decoder_layer_by_hand() -> None:
    """d 4, 4 query dims, 2 KV dims (GQA), MLP 8 (3 matrices), 3 tokens:
    projections 2·3·4·(2·4 + 2·2) = 288, MLP 2·3·4·8·3 = 576, attention 4·4·pairs with
    6 causal pairs (96) or 9 full pairs (144); a decode token over 4 keys: 96 + 192 + 64."""
    t = TextArch(layers=1, hidden=4, q_dim=4, kv_dim=2, intermediate=8, vocab=10)
    assert text_layer_flops(t, 3, 3, causal=True) == 288 + 576 + 96
    assert text_layer_flops(t, 3, 3, causal=False) == 288 + 576 + 144
    assert text_layer_flops(t, 1, 4) == 96 + 192 + 64


def test_llava_15_7b_exact_llm_by_hand() -> None:
    """32 × [2·640·4096·(4·4096) projections + 2·640·4096·11008·3 gated MLP
    + 4·4096·(640·641/2) causal attention] = 8.396 TFLOPs, vs 3.33 T MACs in the paper form."""
    arch = arch_from_config(PRESETS["llava-1.5-7b"].config(), "llava")
    run = RunTokens([640] * 32, [image_geometry(PRESETS["llava-1.5-7b"].config(), "llava",
                                                (336, 336))])
    by_hand = 32 * (2 * 640 * 4096 * 4 * 4096 + 2 * 640 * 4096 * 11008 * 3
                    + 4 * 4096 * 640 * 641 // 2)
    assert exact_flops(arch, run).llm == by_hand
    assert by_hand / 1e12 == pytest.approx(8.396, abs=1e-3)


def test_qwen_windows_by_hand() -> None:
    """Window side 4 merged tokens: an 8×12 patch grid is 4×6 merged tokens → one 4×4 window
    (64 patches) and one 4×2 window (32 patches); 16×16 patches → four full windows."""
    assert qwen_window_sizes((1, 8, 12), 4, 2) == [64, 32]
    assert qwen_window_sizes((1, 16, 16), 4, 2) == [64] * 4


def test_full_preset_sizes() -> None:
    """Published sizes: Qwen2-7B text uses GQA (4 KV heads of 128 → 512) and a gated MLP."""
    qwen = arch_from_config(PRESETS["qwen2.5-vl-7b"].config(), "qwen2_5_vl")
    assert (qwen.text.layers, qwen.text.hidden, qwen.text.q_dim, qwen.text.kv_dim) == (
        28, 3584, 3584, 512)
    assert (qwen.text.intermediate, qwen.text.vocab, qwen.text.mlp_mats) == (18944, 152064, 3)
    assert (qwen.vision.layers, qwen.vision.hidden, qwen.vision.mlp_mats) == (32, 1280, 3)
    llava = arch_from_config(PRESETS["llava-1.5-7b"].config(), "llava")
    assert (llava.vision.layers, llava.vision.hidden, llava.vision.intermediate) == (24, 1024, 4096)
    assert llava.text.kv_dim == llava.text.q_dim == 4096


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_mini_twin_keeps_token_geometry(name: str) -> None:
    """A mini preset has the full preset's depths and, for one image size, its token counts."""
    full, mini = PRESETS[name], PRESETS[PRESETS[name].twin]
    full_cfg, mini_cfg = full.config(), mini.config()
    full_arch, mini_arch = (arch_from_config(c, full.family) for c in (full_cfg, mini_cfg))
    assert full_arch.text.layers == mini_arch.text.layers
    assert full_arch.vision.layers == mini_arch.vision.layers
    assert image_geometry(full_cfg, full.family, full.image_size) == image_geometry(
        mini_cfg, full.family, full.image_size)


def test_image_geometry_of_full_presets() -> None:
    """LLaVA-1.5: 576 tokens; LLaVA-NeXT 672²: 5 crops, 576 + 48·49 = 2928; Qwen 672²:
    48×48 patches → 576 merged tokens."""
    geom = {name: image_geometry(PRESETS[name].config(), PRESETS[name].family,
                                 PRESETS[name].image_size) for name in FULL_PRESETS}
    assert geom["llava-1.5-7b"].tokens == 576
    assert (geom["llava-next-7b"].tokens, geom["llava-next-7b"].crops) == (2928, 5)
    assert geom["qwen2-vl-7b"].grid_thw == (1, 48, 48)
    assert geom["qwen2.5-vl-7b"].tokens == 576
    assert geom["qwen3-vl-8b"].grid_thw == geom["qwen3-vl-30b-a3b"].grid_thw == (1, 42, 42)
    assert geom["qwen3-vl-8b"].tokens == 441  # patch 16: 21×21 merged tokens
    assert (geom["llava-onevision-7b"].tokens, geom["llava-onevision-7b"].crops) == (3699, 5)


def test_onevision_anyres_max_downsamples_large_canvases() -> None:
    """LLaVA-OneVision 2304×2304: 6×6 crops of 27×27 patches, a 162×162 canvas holding 36 crops'
    worth, downsampled by sqrt(36/9) = 2 to 81×81: 729 + 81·82 = 7371 tokens (37 crops)."""
    config = PRESETS["llava-onevision-7b"].config()
    geom = image_geometry(config, "llava_onevision", (2304, 2304))
    assert (geom.tokens, geom.crops, geom.crop_patches) == (729 + 81 * 82, 37, 729)


def test_moe_counts_the_router_and_active_experts_only() -> None:
    """Qwen3-VL-30B-A3B: 8 of 128 experts of width 768 per token, so the MLP of one token is
    2·2048·(8·768·3 + 128) FLOPs (router included), not the 128 experts' 2·2048·128·768·3."""
    text = arch_from_config(PRESETS["qwen3-vl-30b-a3b"].config(), "qwen3_vl_moe").text
    assert (text.intermediate, text.router, text.q_dim, text.kv_dim) == (6144, 128, 4096, 512)
    attention_free = text_layer_flops(text, 1, 1) - 4 * text.q_dim  # one query-key pair
    projections = 2 * 2048 * (2 * 4096 + 2 * 512)
    assert attention_free == projections + 2 * 2048 * (8 * 768 * 3 + 128)


def test_deepstack_mergers_are_counted() -> None:
    """Qwen3-VL-8B: the main merger and three DeepStack mergers of the same shape each see all
    1764 patches of a 672² image; with an encoder cut, each DeepStack merger sees the rows
    leaving its layer (here 400 from layer 10 on)."""
    config = PRESETS["qwen3-vl-8b"].config()
    arch = arch_from_config(config, "qwen3_vl")
    geom = image_geometry(config, "qwen3_vl", (672, 672))
    assert arch.vision.deepstack == (8, 16, 24)
    one = projector_flops(arch.vision, 1764)
    run = RunTokens([441 + 64] * 36, [geom])
    assert exact_flops(arch, run).projector == pytest.approx(4 * one)
    cut = [1764] * 10 + [400] * 17
    run = RunTokens([441 + 64] * 36, [geom], [cut])
    expected = projector_flops(arch.vision, 400) * 3 + projector_flops(arch.vision, 1764)
    assert exact_flops(arch, run).projector == pytest.approx(expected)


def _tiny(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], RunTokens]:
    model = tiny_model(family)
    inputs = synthetic_inputs(model.config, family, image_size=DEFAULT_IMAGE_SIZE[family],
                              text_tokens=12)
    length = inputs["input_ids"].shape[1]
    geometry = image_geometry(model.config, family, DEFAULT_IMAGE_SIZE[family])
    layers = model.config.text_config.num_hidden_layers
    return model, inputs, RunTokens([length] * layers, [geometry])


@pytest.mark.parametrize("family", PROFILED)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpruned_forward_counted_equals_analytic(family: str, attn: str) -> None:
    """A plain forward (logits for every position) of a tiny model: FlopCounterMode (with the
    CPU sdpa formula) equals the analytic count with full n² attention."""
    model, inputs, run = _tiny(family)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        counted, _ = count_flops(lambda: model(**inputs))
    analytic = exact_flops(arch_from_config(model.config, family), run, causal=False,
                           lm_head_tokens=inputs["input_ids"].shape[1])
    assert counted == pytest.approx(analytic.prefill, rel=REL_TOL)


def _counted_vs_analytic(family: str, method: str, new_tokens: int) -> tuple[float, float]:
    """(counted FLOPs less the method's own, analytic FLOPs from ``handle.stats``) of a greedy
    generate of ``new_tokens`` (1: a plain prefill with ``logits_to_keep=1``)."""
    model, inputs, _ = _tiny(family)
    handle = vlprune.patch(model, method, budget=8)
    meter = SelectionMeter(handle.method, torch.device("cpu"))
    meter.count = True
    rows: list[int] = []
    hook = handle.adapter.projector.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].numel() // args[0].shape[-1]))

    def run() -> None:
        if new_tokens == 1:
            model(**inputs, logits_to_keep=1)
        else:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)

    try:
        with torch.no_grad():
            counted, _ = count_flops(run)
        stats = handle.stats
    finally:
        hook.remove()
        meter.remove()
        handle.unpatch()
    geometry = image_geometry(model.config, family, DEFAULT_IMAGE_SIZE[family])
    vision = getattr(stats, "vision_layer_tokens", [])
    tokens = RunTokens(stats.layer_tokens[0], [geometry], vision[:1], sum(rows))
    analytic = exact_flops(arch_from_config(model.config, family), tokens, causal=False,
                           new_tokens=new_tokens)
    return counted - meter.flops, analytic.total


@pytest.mark.parametrize(("method", "family"), PROFILED_PAIRS)
def test_pruned_prefill_counted_equals_analytic(family: str, method: str) -> None:
    """Every registered method on every profiled family it supports: the counted prefill,
    less the method's own selection FLOPs, equals the analytic count built from
    ``handle.stats`` (decoder and encoder per-layer tokens) and the observed projector rows."""
    counted, analytic = _counted_vs_analytic(family, method, new_tokens=1)
    assert counted == pytest.approx(analytic, rel=REL_TOL)


@pytest.mark.parametrize("family", PROFILED)
@pytest.mark.parametrize("method", ["random", "fastv"])
def test_pruned_decode_counted_equals_analytic(family: str, method: str) -> None:
    """Greedy generate of 3 tokens (prefill + 2 decode steps over the pruned per-layer KV
    cache, vision-side and decoder-side cuts) equals the analytic prefill + decode."""
    counted, analytic = _counted_vs_analytic(family, method, new_tokens=3)
    assert counted == pytest.approx(analytic, rel=REL_TOL)


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_full_size_meta_count_equals_analytic(name: str) -> None:
    """Full-size modules on the meta device (no weights allocated): counted prefill and decode
    equal the analytic count, unpruned and with a FastV-style schedule (K=2, 64 kept)."""
    preset = PRESETS[name]
    model = build_preset_model(preset, device="meta")
    assert next(model.parameters()).device.type == "meta"
    arch = arch_from_config(model.config, preset.family)
    geometry = image_geometry(model.config, preset.family, preset.image_size)
    length = geometry.tokens + 64
    counter = MetaCounter(model, preset.family)
    for layers in ([length] * arch.text.layers, [length] * 2 + [128] * (arch.text.layers - 2)):
        run = RunTokens(layers, [geometry])
        counted = counter.count(run, new_tokens=3)
        analytic = exact_flops(arch, run, causal=False, new_tokens=3)
        for part in ("vision", "projector", "llm", "lm_head", "decode"):
            assert getattr(counted, part) == pytest.approx(getattr(analytic, part), rel=REL_TOL)


def test_hybrid_decoders_are_refused_clearly() -> None:
    """Qwen3.5's linear-attention (Gated DeltaNet) layers are not modelled: a clear error, not a
    count that silently treats them as attention layers."""
    with pytest.raises(NotImplementedError, match="linear-attention layers of qwen3_5"):
        arch_from_config(tiny_model("qwen3_5").config, "qwen3_5")
