"""Tests for ``mmtok``: the coverage objective, its greedy maximiser, text targets, LLaVA-NeXT crop
mapping, Qwen pre-merger order, and the method on tiny models of every family."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import vlprune
from vlprune.adapters.base import ImageLayout
from vlprune.budget import Budget
from vlprune.methods._coverage import coverage_matrix, coverage_value, greedy_coverage
from vlprune.methods._stopwords import stopword_mask
from vlprune.methods._vision_common import newline_tokens, partition_tokens
from vlprune.methods.base import VisionBatch
from vlprune.methods.mmtok import MMTok, _pre_features, mmtok_stopwords
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model, tiny_tokenizer

DEFAULTS = {"tv_temperature": 0.02, "vv_temperature": 0.2, "alpha": 0.5}
# The tiny LLaVA-NeXT image (150×100, crop grid 2×2 of 6×6 patches, unpadded canvas 8×12 at
# row offset 2): thumbnail 36 + 4 crops × 24 surviving patches + 8 newlines = 140 tokens.
NEXT_LAYOUT = ImageLayout(
    num_tokens=140, grid=(6, 6), crop_grid=(2, 2), highres=(8, 12), highres_offset=(2, 0),
    newline=True,
)


def _cover(text, post, pre, text_mask=None, valid=None):
    """Coverage rows of a single unit from unbatched tensors."""
    text_mask = torch.ones(text.shape[0], dtype=torch.bool) if text_mask is None else text_mask
    valid = torch.ones(post.shape[0], dtype=torch.bool) if valid is None else valid
    return coverage_matrix(
        text[None], text_mask[None], post[None], pre[None], valid[None], **DEFAULTS
    )


def _brute_force(cover: torch.Tensor, k: int) -> tuple[tuple[int, ...], float]:
    values = {
        s: float(coverage_value(cover, torch.tensor([s]))[0])
        for s in itertools.combinations(range(cover.shape[2]), k)
    }
    best = max(values, key=values.get)
    return best, values[best]


# ----------------------------------------------------------------------------- objective, greedy


def test_greedy_equals_brute_force_on_two_clusters() -> None:
    """Two pre-projector clusters of three (edge, centre, edge) and one text token matching
    token 5 only: k=1 takes the text's token 5, k=2 adds cluster A's centre 1, k=3 adds 3 (B's
    far edge). For every k ≤ 3 the greedy set is the unique brute-force maximiser of F."""
    pre = torch.tensor([
        [1.0, 0.3, 0, 0], [1, 0, 0, 0], [1, -0.3, 0, 0],
        [0, 0, 1, 0.3], [0, 0, 1, 0], [0, 0, 1, -0.3],
    ])
    cover = _cover(torch.eye(6)[[5]], torch.eye(6), pre)
    expected = {1: [5], 2: [5, 1], 3: [5, 1, 3]}
    for k in (1, 2, 3):
        picks = greedy_coverage(cover, k)
        best, value = _brute_force(cover, k)
        assert picks[0].tolist() == expected[k]
        assert tuple(sorted(picks[0].tolist())) == best
        assert float(coverage_value(cover, picks)[0]) == pytest.approx(value, abs=1e-6)


def test_greedy_matches_brute_force_and_bound_on_random_draws() -> None:
    """Random 7-token draws: k=1 greedy is optimal; k ≤ 3 greedy reaches ≥ (1 - 1/e)·OPT."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        cover = _cover(*(torch.randn(n, 5, generator=gen) for n in (3, 7, 7)))
        for k in (1, 2, 3):
            value = float(coverage_value(cover, greedy_coverage(cover, k))[0])
            _, best = _brute_force(cover, k)
            assert value >= (1 - 1 / torch.e) * best - 1e-6
            if k == 1:
                assert value == pytest.approx(best, abs=1e-7)


def test_objective_is_monotone_and_gains_are_marginal() -> None:
    """F of the greedy prefix never decreases in k (up to all N tokens), and each step's gain
    Σ_r max(C[r, j] - best[r], 0) equals F(S ∪ {j}) - F(S)."""
    gen = torch.Generator().manual_seed(1)
    cover = _cover(*(torch.randn(n, 8, generator=gen) for n in (4, 12, 12)))
    picks = greedy_coverage(cover, 12)
    values = [float(coverage_value(cover, picks[:, :k])[0]) for k in range(13)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert len(set(picks[0].tolist())) == 12
    best = cover[0, :, picks[0, :3]].amax(1)
    gain = (cover[0, :, picks[0, 3]] - best).clamp_min(0).sum()
    assert float(gain) == pytest.approx(values[4] - values[3], abs=1e-6)


def test_batched_units_equal_single_runs() -> None:
    """Units stacked with padded text rows (text_mask) and masked candidates (valid) give the
    same coverage rows and picks as each unit alone on its own text and candidates."""
    gen = torch.Generator().manual_seed(2)
    texts = [torch.randn(m, 6, generator=gen) for m in (2, 5, 0)]
    posts = torch.randn(3, 10, 6, generator=gen)
    pres = torch.randn(3, 10, 4, generator=gen)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, [0, 7]] = False
    text = torch.zeros(3, 5, 6)
    text_mask = torch.zeros(3, 5, dtype=torch.bool)
    for g, t in enumerate(texts):
        text[g, : len(t)] = t
        text_mask[g, : len(t)] = True
    cover = coverage_matrix(text, text_mask, posts, pres, valid, **DEFAULTS)
    picks = greedy_coverage(cover, 4, valid)
    for g, t in enumerate(texts):
        keep = valid[g].nonzero().squeeze(1)
        alone = _cover(t, posts[g, keep], pres[g, keep])
        assert keep[greedy_coverage(alone, 4)[0]].tolist() == picks[g].tolist()
        rows = torch.cat([text_mask[g], valid[g]])
        assert torch.allclose(cover[g][rows][:, keep], alone[0], atol=1e-7)


# ----------------------------------------------------------------------------- text targets


def test_stopword_mask_singles_and_phrases() -> None:
    """Single ids are dropped anywhere; a phrase only where the whole sequence occurs."""
    ids = torch.tensor([[5, 1, 2, 3, 1, 9, 1, 2]])
    mask = stopword_mask(ids, [[9], [1, 2]])
    assert mask[0].tolist() == [False, True, True, False, False, True, True, True]


def test_mmtok_stopwords_on_tiny_tokenizer() -> None:
    """Special tokens are always in; words and phrases map to their ids; unknown words vanish."""
    tok = tiny_tokenizer()
    stop = mmtok_stopwords(tok, words=("w5", "nonsense"), phrases=("w1 w2",))
    assert [[i] for i in tok.all_special_ids if [i] in stop] == [[i] for i in tok.all_special_ids]
    assert [tok.convert_tokens_to_ids("w5")] in stop
    assert tok.convert_tokens_to_ids(["w1", "w2"]) in stop
    assert len(stop) == len(tok.all_special_ids) + 2


def test_mmtok_stopwords_in_context_on_byte_level_bpe() -> None:
    """On a byte-level BPE (Qwen-like), words are caught at the start, after a space and after a
    newline, and the lmms-eval suffix and chat roles vanish: only the content words remain."""
    corpus = [
        "What color is the cat? Answer the question using a single word or phrase.",
        "USER: Describe the image.\nWhat is on the table? ASSISTANT:",
        "the cat and the dog sat on a red mat",
    ] * 10
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    prompt = (
        "USER: Describe the image.\nWhat color is the cat? "
        "Answer the question using a single word or phrase. ASSISTANT:"
    )
    ids = torch.tensor([tok.encode(prompt)])
    kept = ids[0][~stopword_mask(ids, mmtok_stopwords(tok))[0]]
    assert tok.decode(kept).split() == ["Describe", "image", "color", "cat"]


def _hand_sample(n_text: int, seed: int, n_images: int = 1) -> dict:
    """One unpadded prompt: n_text text tokens (ids 20..), then images of 4×4 tokens (id 4)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([20 + torch.arange(n_text), torch.full((16 * n_images,), 4)])
    embeds = torch.randn(len(ids), 8, generator=gen)
    pre = torch.randn(n_images, 16, 5, generator=gen)
    return {"ids": ids, "embeds": embeds, "pre": pre}


def _hand_batch(samples: list[dict], budget: int, pad_id: int = 0) -> VisionBatch:
    """Left-pad hand-made samples into one LLaVA-like VisionBatch (4×4 images, 16 tokens)."""
    length = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id)
    embeds = torch.linspace(-1, 1, 8).expand(len(samples), length, 8).clone()  # pad embedding
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    positions, sample, features, pres = [], [], [], []
    for b, s in enumerate(samples):
        n = len(s["ids"])
        ids[b, length - n:] = s["ids"]
        embeds[b, length - n:] = s["embeds"]
        mask[b, length - n:] = 1
        image_pos = (ids[b] == 4).nonzero().squeeze(1).split(16)
        for pos, pre in zip(image_pos, s["pre"]):
            positions.append(pos)
            sample.append(b)
            features.append(embeds[b, pos])
            pres.append(pre)
    layouts = [ImageLayout(num_tokens=16, grid=(4, 4))] * len(positions)
    probes = {"vision": SimpleNamespace(value=torch.stack(pres))}
    return VisionBatch(
        layouts=layouts, keep=[budget] * len(layouts), features=features, sample=sample,
        input_ids=ids, text_embeds=embeds, probes=probes, positions=positions,
        budget=Budget(tokens=budget), attention_mask=mask if len(samples) > 1 else None,
    )


def _method(**options) -> MMTok:
    method = MMTok(**options)
    method.tv_temperature = method.tv_temperature or 0.02
    return method


def test_select_batch_equals_per_sample_runs() -> None:
    """A left-padded batch of 3 prompts (one with two images) selects, per image, exactly what
    each prompt selects alone: padding and other prompts' text never become targets."""
    samples = [_hand_sample(3, 0), _hand_sample(7, 1, n_images=2), _hand_sample(1, 2)]
    method = _method(stopwords=[21, [22, 23]])
    batched = method.select(_hand_batch(samples, budget=5))
    alone = [idx for s in samples for idx in method.select(_hand_batch([s], budget=5))]
    assert [b.tolist() for b in batched] == [a.tolist() for a in alone]
    assert all(len(b) == 5 and (b.diff() > 0).all() for b in batched)


def test_text_targets_drop_images_padding_and_stopwords_with_fallback() -> None:
    """Targets: text rows that are not padding, images or stop words; a prompt whose text is all
    stop words falls back to its unfiltered text (official behaviour)."""
    samples = [_hand_sample(3, 0), _hand_sample(1, 1)]
    batch = _hand_batch(samples, budget=4)
    text, mask = _method(stopwords=[[20], [21]])._text_targets(batch)
    assert mask.tolist() == [[True], [True]]
    assert torch.equal(text[0, 0], samples[0]["embeds"][2])  # id 22, the only non-stop word
    assert torch.equal(text[1, 0], samples[1]["embeds"][0])  # id 20 alone: fallback


def test_options_are_validated() -> None:
    for options in (
        {"alpha": -1}, {"tv_temperature": 0}, {"vv_temperature": "x"}, {"keep_newlines": 1},
        {"stopwords": "the"}, {"stopwords": [[]]}, {"stopwords": [[-1]]}, {"alpha": True},
    ):
        with pytest.raises(ValueError, match=next(iter(options))):
            MMTok(**options)


# ----------------------------------------------------------------------------- LLaVA-NeXT crops


def test_next_budget_is_per_crop() -> None:
    """budget k keeps k per crop (5k); keep_newlines adds the 8 newlines; a budget covering
    every crop keeps the whole image, newlines included."""
    assert MMTok().budgets([NEXT_LAYOUT], Budget(tokens=4)) == [20]
    assert MMTok(keep_newlines=True).budgets([NEXT_LAYOUT], Budget(tokens=4)) == [28]
    assert MMTok().budgets([NEXT_LAYOUT], Budget(tokens=30)) == [30 + 4 * 24]
    assert MMTok().budgets([NEXT_LAYOUT], Budget(tokens=36)) == [140]
    assert MMTok().budgets([NEXT_LAYOUT], Budget(ratio=0.5)) == [18 + 4 * 12]


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family: str) -> torch.nn.Module:
    """Tiny model whose pad embedding is not zero (as in real checkpoints), so a pad token taken
    for text would change the selection."""
    model = tiny_model(family)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        pad = model.config.get_text_config().pad_token_id
        embeddings[pad] = torch.linspace(-0.05, 0.05, embeddings.shape[1])
    return model


SIZES = {
    "llava": [(84, 84)] * 3,
    "llava_next": [(150, 100), (100, 150), (150, 100)],
    "qwen2_vl": [(168, 112), (112, 112), (168, 112)],
    "qwen2_5_vl": [(168, 112), (112, 168), (224, 168)],
    "qwen3_vl": [(192, 128), (128, 128), (192, 128)],
    "qwen3_vl_moe": [(192, 128), (128, 192), (256, 192)],
    "llava_onevision": [(150, 100), (100, 150), (150, 100)],
    "qwen3_5": [(192, 128), (128, 192), (256, 192)],
}


def _run(model, inputs, **options) -> tuple[list, vlprune.PatchHandle, torch.Tensor]:
    """Patched forward; returns the (batch, kept) of its one selection, the handle, logits."""
    calls = []
    with vlprune.patch(model, "mmtok", **options) as handle:
        select = handle.method.select

        def spy(batch: VisionBatch) -> list[torch.Tensor]:
            kept = select(batch)
            calls.append((batch, kept, _aligned(model, batch)))
            return kept

        handle.method.select = spy
        with torch.no_grad():
            logits = model(**inputs).logits
    assert len(calls) == 1
    return calls[0], handle, logits


def _aligned(model, batch: VisionBatch) -> bool:
    """Whether the pre-projector features MMTok uses line up with the image tokens: projecting
    them (Qwen: merging each token's patches) gives the post-projector features."""
    value = batch.probes["vision"].value
    projector = model.model.visual.merger if "patches" in batch.probes else (
        model.model.multi_modal_projector
    )
    if "patches" in batch.probes:
        order = batch.probes["patches"].token_of_patch().argsort(stable=True)
        grouped = value[order]
        means = grouped.view(-1, 4, grouped.shape[-1]).mean(1)
        ours = torch.cat([p[0] for p in _pre_features(batch)])
        return torch.allclose(projector(grouped), torch.cat(batch.features), atol=1e-5) and (
            torch.allclose(ours, means, atol=1e-6)
        )
    ok = True
    for i, (layout, pre) in enumerate(zip(batch.layouts, _pre_features(batch))):
        token_map = torch.stack(partition_tokens(layout))
        valid = token_map >= 0
        ok &= torch.allclose(projector(pre)[valid], batch.features[i][token_map[valid]], atol=1e-5)
    return ok


def _expected(layouts: list[ImageLayout], budget: int) -> list[int]:
    """Σ over each image's crops of min(budget, surviving patches)."""
    sizes = [(torch.stack(partition_tokens(layout)) >= 0).sum(1) for layout in layouts]
    return [int(n.clamp(max=budget).sum()) for n in sizes]


def test_batch_keeps_budget_and_equals_single_runs(family: str, model) -> None:
    """Left-padded batch of 3 with different image sizes: pre-projector features line up with
    the tokens, every image keeps its budget (per crop on LLaVA-NeXT, newlines dropped) and the
    same tokens as its prompt alone. No stop words: padding must be recognised by its mask."""
    inputs = tiny_inputs(family, batch=3, image_sizes=SIZES[family])
    (batch, kept, aligned), handle, _ = _run(model, inputs, budget=3)
    assert aligned
    assert handle.stats.kept_per_image == _expected(batch.layouts, 3)
    assert handle.stats.settings["tv_temperature"] == (0.01 if "qwen" in family else 0.02)
    for i, size in enumerate(SIZES[family]):
        single = tiny_inputs(family, n_words=[(5, 9, 3)[i]], image_sizes=[size], seed=i)
        (_, alone, _), _, _ = _run(model, single, budget=3)
        assert alone[0].tolist() == kept[i].tolist()


def test_generate_batch(family: str, model) -> None:
    """Batched greedy generate() runs on the pruned prompt and keeps the budget (ratio)."""
    inputs = tiny_inputs(family, batch=3, image_sizes=SIZES[family])
    stop = mmtok_stopwords(tiny_tokenizer())
    with vlprune.patch(model, "mmtok", ratio=0.25, stopwords=stop) as handle:
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        kept = handle.stats.kept_per_image
    assert out.shape == (3, inputs["input_ids"].shape[1] + 6)
    assert all(0 < k < v for k, v in zip(kept, handle.stats.visual_tokens))


def test_keep_all_equals_unpatched(family: str, model) -> None:
    """A budget above every crop's size keeps whole images: logits equal the unpatched model."""
    inputs = tiny_inputs(family, batch=2)
    with torch.no_grad():
        reference = model(**inputs).logits
    _, handle, logits = _run(model, inputs, budget=10_000)
    assert handle.stats.kept_per_image == handle.stats.visual_tokens
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_next_keep_newlines() -> None:
    """LLaVA-NeXT with keep_newlines: the 8 newline tokens stay on top of 5 crops × budget."""
    model, inputs = tiny_model("llava_next"), tiny_inputs("llava_next")
    (batch, kept, _), handle, _ = _run(model, inputs, budget=2, keep_newlines=True)
    assert handle.stats.kept_per_image == [5 * 2 + 8]
    assert set(newline_tokens(batch.layouts[0]).tolist()) <= set(kept[0].tolist())
