"""The decoder-side cut at layer K (``fastv``, internal ``fixed_layer``).

Layers < K see the full sequence and layers >= K only text + kept visual rows at their original
positions. Keep-all equals the unpatched model; ``fixed_layer`` equals a reference that runs the
decoder layers by hand; the KV cache and ``stats.layer_tokens`` show the two lengths; cached
generation equals uncached; a padded batch equals per-sample runs; unpatch restores the model.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

import vlprune
from tests.helpers import (
    ATTNS,
    BIG,
    MAX_NEW,
    cached_inputs,
    cached_model,
    capture_lm_kwargs,
    forward,
    gather_positions,
    generate,
    kept_lm_extras,
    trim,
)
from vlprune.adapters import get_adapter
from vlprune.compat import call_cache, output_cache
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

K = 2
ORDINALS = [0, 3, 5]


def _keep_rows(is_image: torch.Tensor, ordinals: list[int]) -> torch.Tensor:
    """(B, Lp): every non-visual row + the visual rows whose ordinal is listed."""
    ordinal = is_image.long().cumsum(1) - 1
    keep = ~is_image | (is_image & torch.isin(ordinal, torch.tensor(ordinals)))
    counts = keep.sum(1)
    assert bool((counts == counts[0]).all())
    return torch.stack([row.nonzero().squeeze(1) for row in keep])


def _reference_logits(model, inputs, ordinals: list[int], layer: int) -> tuple[torch.Tensor, ...]:
    """Run the language model's layers by hand, mirroring ``LlamaModel.forward`` /
    ``Qwen2VLTextModel.forward`` / ``Qwen3VLTextModel.forward`` / ``Qwen3_5TextModel.forward``:
    full sequence for layers < ``layer``, then only the kept rows (fresh causal mask over them,
    RoPE of their original positions; linear-attention layers: the 2-D padding mask of those
    rows, their recurrence over them alone) for the rest; DeepStack features are added after
    layer i < their count at the visual positions alive there."""
    lm = model.model.language_model
    kw = capture_lm_kwargs(model, inputs)
    embeds = kw["inputs_embeds"]
    batch, length = embeds.shape[:2]
    mask = kw.get("attention_mask")
    if mask is None:  # a None mask means plain causal: all ones is the same, explicitly
        mask = torch.ones(batch, length, dtype=torch.long)
    pos = kw.get("position_ids")
    mrope = model.config.model_type.startswith("qwen")
    if pos is None:
        pos = torch.arange(length).expand(batch, length)
    if mrope:
        assert pos.shape == (3, batch, length)
        layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"]
        assert set(layer_types) <= {"full_attention", "linear_attention"}
    is_image = inputs["input_ids"] == model.config.image_token_id
    keep = _keep_rows(is_image, ordinals)
    rows = torch.arange(batch)[:, None]

    types = getattr(lm.config, "layer_types", None) or []

    def run(hidden, mask2d, positions, layers, extras):
        causal = create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=mask2d, **call_cache(None),
            position_ids=None if mrope else positions,
        )
        recurrent = create_recurrent_attention_mask(lm.config, hidden, mask2d)
        cos_sin = lm.rotary_emb(hidden, positions)
        deepstack = extras.get("deepstack_visual_embeds", [])
        for i in layers:
            linear = i < len(types) and types[i] == "linear_attention"
            hidden = lm.layers[i](
                hidden, attention_mask=recurrent if linear else causal,
                position_embeddings=cos_sin,
                position_ids=None if mrope else positions, **call_cache(None), use_cache=False,
            )
            if i < len(deepstack):
                hidden = hidden.clone()
                hidden[extras["visual_pos_masks"]] += deepstack[i]
        return hidden

    everything = torch.arange(length).expand(batch, length)
    n_layers = len(lm.layers)
    with torch.no_grad():
        hidden = run(embeds, mask, pos, range(layer), kept_lm_extras(kw, everything))
        hidden = run(hidden[rows, keep], mask.gather(1, keep), gather_positions(pos, keep),
                     range(layer, n_layers), kept_lm_extras(kw, keep))
        logits = model.lm_head(lm.norm(hidden))
    return logits, mask.gather(1, keep).bool()


# ------------------------------------------------------------------------------ keep-all


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_at_layer_k_equals_unpatched(family: str, attn: str) -> None:
    """fastv keeping every visual token at layer 2: logits and greedy tokens unchanged."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=2)
    ref_logits = forward(model, inputs).logits
    ref_tokens = generate(model, inputs)
    with vlprune.patch(model, "fastv", budget=BIG, layer=K) as handle:
        logits = forward(model, inputs).logits
        stats = handle.stats
        tokens = generate(model, inputs)
    length = inputs["input_ids"].shape[1]
    assert stats.kept_tokens == stats.visual_tokens
    assert stats.layer_tokens == [[length] * 4] * 2
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


# -------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_layer_equals_hand_run_layers(family: str, attn: str, batch: int) -> None:
    """fixed_layer logits == layers < K on the full sequence, layers >= K on the kept rows."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=batch)
    ref, valid = _reference_logits(model, inputs, ORDINALS, K)
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=ORDINALS, layer=K) as handle:
        logits = forward(model, inputs).logits
        stats = handle.stats
    assert logits.shape == ref.shape
    assert stats.kept_tokens == [len(ORDINALS)] * batch
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_layer_generate_cache_equals_no_cache(family: str, attn: str, batch: int) -> None:
    """Decode through per-layer caches of two lengths == re-running the (oracle) prefill."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=batch)
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=ORDINALS, layer=K):
        cached = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attn", ATTNS)
def test_cut_at_a_linear_attention_layer_equals_hand_run_layers(attn: str) -> None:
    """Qwen3.5, cut at layer 3 (Gated DeltaNet): its recurrence runs over the kept rows only,
    as the hand-run reference feeds it; a padded batch of 2 and cached == uncached decoding."""
    model, inputs = cached_model("qwen3_5", attn), cached_inputs("qwen3_5", batch=2)
    assert 3 in get_adapter(model).recurrent_layers
    ref, valid = _reference_logits(model, inputs, ORDINALS, 3)
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=ORDINALS, layer=3) as handle:
        logits = forward(model, inputs).logits
        assert handle.stats.layer_tokens[0][2:] == [inputs["input_ids"].shape[1],
                                                    logits.shape[1]]
        cached = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-5, rtol=0)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------- layer tokens, cache


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_tokens_and_cache_lengths(family: str, attn: str) -> None:
    """Full length before layer K, short from K on: in stats and in each layer's KV cache."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=2)
    length = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    short = length - n_visual + 5
    with vlprune.patch(model, "fastv", budget=5, layer=K) as handle:
        out = forward(model, inputs, use_cache=True)
        stats = handle.stats
    assert stats.visual_tokens == [n_visual] * 2
    assert stats.kept_tokens == [5, 5]
    assert stats.layer_tokens == [[length, length, short, short]] * 2
    assert out.logits.shape[1] == short
    recurrent = get_adapter(model).recurrent_layers  # Qwen3.5: no KV cache there
    cache_lengths = [layer.keys.shape[2] for i, layer in enumerate(output_cache(out).layers)
                     if i not in recurrent]
    assert cache_lengths == [n for i, n in enumerate([length, length, short, short])
                             if i not in recurrent]
    assert output_cache(out).get_seq_length() == length  # layer 0: generate's bookkeeping


def test_cut_at_layer_one_and_three() -> None:
    """K is honoured wherever it is: K=1 and K=3 give the expected per-layer lengths."""
    model, inputs = cached_model("qwen2_vl"), cached_inputs("qwen2_vl")
    length = inputs["input_ids"].shape[1]
    short = length - 24 + 4
    for layer, expected in ((1, [length, short, short, short]), (3, [length] * 3 + [short])):
        with vlprune.patch(model, "fastv", budget=4, layer=layer) as handle:
            out = forward(model, inputs, use_cache=True)
            assert handle.stats.layer_tokens == [expected]
        assert [lay.keys.shape[2] for lay in output_cache(out).layers] == expected


# --------------------------------------------------------------------------------- batch


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_single_runs(family: str, attn: str) -> None:
    """fastv (budget 5): a left-padded batch of 3 == each prompt alone (logits, tokens)."""
    n_words = (5, 9, 3)
    model = cached_model(family, attn)
    batch = cached_inputs(family, batch=3, n_words=n_words)
    eos = model.generation_config.eos_token_id
    with vlprune.patch(model, "fastv", budget=5, layer=K) as handle:
        logits = forward(model, batch).logits[:, -1]
        assert handle.stats.kept_tokens == [5, 5, 5]
        tokens = generate(model, batch)
        for i, n in enumerate(n_words):
            single = cached_inputs(family, batch=1, n_words=(n,), seed=i)
            single_logits = forward(model, single).logits[0, -1]
            torch.testing.assert_close(logits[i], single_logits, atol=1e-4, rtol=0)
            single_tokens = generate(model, single)
            assert trim(tokens[i], eos) == trim(single_tokens[0], eos), f"sample {i}"


def test_rows_with_different_visual_counts_keep_the_budget_each() -> None:
    """LLaVA-NeXT, images of different sizes: every row keeps exactly the budget from layer K
    on (padded slots are masked), and each row equals its prompt run alone."""
    model = cached_model("llava_next")
    sizes = [(150, 100), (100, 220)]
    inputs = tiny_inputs("llava_next", batch=2, image_sizes=sizes)
    n_visual = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_visual[0] != n_visual[1]
    length = inputs["input_ids"].shape[1]
    with vlprune.patch(model, "fastv", budget=6, layer=K) as handle:
        out = forward(model, inputs, use_cache=True)
        stats = handle.stats
        last = out.logits[:, -1]
        for i in range(2):
            single = tiny_inputs("llava_next", batch=1, image_sizes=[sizes[i]], seed=i,
                                 n_words=[(5, 9)[i]])
            torch.testing.assert_close(forward(model, single).logits[0, -1], last[i],
                                       atol=1e-4, rtol=0)
    assert stats.kept_tokens == [6, 6]
    kept_len = [length - n + 6 for n in n_visual]
    assert [row[:K] for row in stats.layer_tokens] == [[length] * K] * 2
    assert [row[K:] for row in stats.layer_tokens] == [[k] * (4 - K) for k in kept_len]
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=ORDINALS, layer=K):
        cached = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------- unpatch


@pytest.mark.parametrize("method", ["fastv", "fixed_layer"])
@pytest.mark.parametrize("attn", ATTNS)
def test_unpatch_restores_bit_identical_outputs(attn: str, method: str) -> None:
    """After a decoder cut and unpatch: bit-identical logits and tokens to a never-patched twin."""
    family = "qwen2_5_vl" if method == "fastv" else "llava"
    patched = tiny_model(family, attn_implementation=attn, seed=5)
    fresh = tiny_model(family, attn_implementation=attn, seed=5)
    inputs = cached_inputs(family, batch=2)
    options = {"indices": ORDINALS} if method == "fixed_layer" else {}
    with vlprune.patch(patched, method, budget=4, layer=K, **options):
        forward(patched, inputs, use_cache=True)
        generate(patched, inputs)
    for module in patched.modules():
        for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            owner = getattr(getattr(hook, "func", hook), "__func__", hook)
            assert not getattr(owner, "__module__", "").startswith("vlprune")
    assert torch.equal(forward(patched, inputs).logits, forward(fresh, inputs).logits)
    assert torch.equal(generate(patched, inputs), generate(fresh, inputs))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_manual_cached_decode_equals_generate(family: str) -> None:
    """A hand-rolled cached decode (no position_ids) after a decoder cut == generate's logits."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    patch = vlprune.patch(model, "fixed_layer", budget=BIG, indices=ORDINALS, layer=K)
    with patch, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        tokens = gen.sequences[:, inputs["input_ids"].shape[1]:]
        out = model(**inputs, use_cache=True)
        logits, mask, cache = [out.logits[:, -1]], inputs["attention_mask"], output_cache(out)
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=mask, **call_cache(cache),
                        use_cache=True)
            logits.append(out.logits[:, -1])
            cache = output_cache(out)
    torch.testing.assert_close(torch.stack(logits, 1), torch.stack(gen.logits, 1),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_beam_search_equals_unpatched(family: str) -> None:
    """Decoder cut under beam search: keep-all == unpatched; fixed_layer cached == uncached."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    ref = generate(model, inputs, num_beams=2)
    with vlprune.patch(model, "fastv", budget=BIG, layer=K):
        assert torch.equal(generate(model, inputs, num_beams=2), ref)
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=ORDINALS, layer=K):
        cached = generate(model, inputs, num_beams=2)
        assert torch.equal(cached, generate(model, inputs, num_beams=2, use_cache=False))
