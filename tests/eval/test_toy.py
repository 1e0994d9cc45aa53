"""The toy VLM benchmark: deterministic synthetic QA, the toy LLaVA's processor and training
helpers, and the shipped checkpoint (accuracy reproduces; methods beat random at 64 of 576
tokens; keep-all equals the unpruned model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlprune.eval.toy import data
from vlprune.eval.toy.drawing import render, shape_mask
from vlprune.eval.toy.language_stage import (
    FeaturePool,
    build_pool,
    kept_patches,
    language_batch,
    language_loss,
    lookup_loss,
    packed,
    positions,
)
from vlprune.eval.toy.model import (
    WORDS,
    answer_ids,
    prompt,
    toy_model,
    toy_processor,
)
from vlprune.eval.toy.scenes import (
    COLORS,
    IMAGE_SIZE,
    MARGIN,
    MAX_OBJECTS,
    MIN_OBJECTS,
    SHAPES,
    Scene,
    Shape,
    pair_index,
)
from vlprune.eval.toy.train import TrainConfig, small_share
from vlprune.eval.toy.vision_stage import (
    IGNORE,
    N_PAIRS,
    encode,
    pixels,
    vision_targets,
    window_index,
)

# ----------------------------------------------------------------------------- data


def _scene(*objects: tuple[str, str, int, int]) -> Scene:
    """A hand-made scene of (kind, colour, x, y) objects of size 40."""
    return Scene((220, 220, 220), tuple(Shape(k, c, x, y, 40) for k, c, x, y in objects))


def _answers(scene: Scene, kind: str, draws: int = 40) -> set[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    return {data.ask(scene, kind, rng) for _ in range(draws)}


def test_sample_is_a_pure_function_of_split_and_index() -> None:
    """Sample i of a split is identical however often / in whichever order it is drawn, and the
    held-out split shares no image with the training stream."""
    a = [data.sample("test", i) for i in (5, 3)]
    b = [data.sample("test", i) for i in (3, 5)][::-1]
    for x, y in zip(a, b):
        assert (x.question, x.subject, x.answer, x.kind) == (y.question, y.subject, y.answer,
                                                             y.kind)
        assert x.image.tobytes() == y.image.tobytes()
    train = {data.sample("train", i).image.tobytes() for i in range(20)}
    assert not train & {data.sample("test", i).image.tobytes() for i in range(20)}


def test_kinds_are_balanced_and_answers_are_vocabulary_words() -> None:
    """Kind = KINDS[i % 4]; every answer is in ANSWERS and every word is a tokenizer word
    (no <unk>); presence is about half yes (400 draws: 0.5 ± 2.5 standard deviations)."""
    samples = data.samples("test", 80)
    assert [s.kind for s in samples] == [data.KINDS[i % 4] for i in range(80)]
    assert all(s.answer in data.ANSWERS for s in samples)
    words = set(WORDS)
    assert all(set(s.question.split()) | {s.subject} <= words for s in samples)
    presence = [data.scene_with_questions("test", i, ("presence",))[1][0][2] for i in range(400)]
    assert 0.4 < presence.count("yes") / len(presence) < 0.6


def test_samples_of_some_kinds() -> None:
    """`kinds` keeps the first n samples of those kinds, identical to the unfiltered ones at
    the same indices; an unknown kind is a ValueError naming the parameter."""
    color = data.samples("test", 3, kinds=("color",))
    assert [s.kind for s in color] == ["color"] * 3
    every = data.samples("test", 9)
    assert [s.question for s in color] == [s.question for s in every[::4]][:3]
    with pytest.raises(ValueError, match="kinds"):
        data.samples("test", 1, kinds=("colour",))


def test_questions_on_a_hand_made_scene() -> None:
    """Two circles (red, blue) and a green square: colour is asked only of the square, circles
    count 2, a red square is an absent (adversarial) pair, the red circle at x=50 is on the
    left, the blue one at x=250 on the right, the square at x=160 is too close to the middle
    (168) to be asked about; every reply starts with its subject word (position: the colour,
    unique in the scene)."""
    scene = _scene(("circle", "red", 50, 50), ("circle", "blue", 250, 250),
                   ("square", "green", 160, 100))
    assert _answers(scene, "color") == {("what color is the square ?", "square", "green")}
    assert ("how many circles are there ?", "circles", "2") in _answers(scene, "count")
    assert ("how many triangles are there ?", "triangles", "0") in _answers(scene, "count")
    presence = _answers(scene, "presence", 200)
    assert ("is there a red circle ?", "red-circle", "yes") in presence
    assert ("is there a red square ?", "red-square", "no") in presence
    assert all(q != "is there a red circle ?" or a == "yes" for q, _, a in presence)
    assert _answers(scene, "position", 200) == {
        ("is the red circle on the left or right ?", "red", "left"),
        ("is the blue circle on the left or right ?", "blue", "right"),
    }


def test_position_needs_a_unique_colour() -> None:
    """Two red objects: neither is asked about for left / right."""
    scene = _scene(("circle", "red", 50, 50), ("square", "red", 250, 250))
    assert _answers(scene, "position") == {None}


def test_position_is_judged_in_the_full_frame() -> None:
    """A training window's objects are left or right of the full image's midline: an object at
    x=100 of a window starting at x0=140 is right of 168."""
    shape = Shape("circle", "red", 100, 60, 40)
    window = Scene((220, 220, 220), (shape,), size=168, x0=140)
    assert data.ask(window, "position", np.random.default_rng(0))[2] == "right"
    assert data.ask(Scene((220, 220, 220), (shape,)), "position",
                    np.random.default_rng(0))[2] == "left"


def test_objects_are_separate_and_inside_the_canvas() -> None:
    """Objects never overlap (centre distance ≥ mean size + margin) and stay on the canvas."""
    for i in range(30):
        objects = data.sample("train", i).scene.objects
        assert MIN_OBJECTS <= len(objects) <= MAX_OBJECTS
        for a in objects:
            assert a.size / 2 <= a.x <= IMAGE_SIZE - a.size / 2
            for b in objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) >= (a.size + b.size) / 2 + MARGIN


# ----------------------------------------------------------------------------- model


def test_processor_gives_576_placeholders_and_clip_pixels() -> None:
    """One prompt → 576 <image> ids (24×24, CLS dropped) and 336 px pixels that equal the
    training path's :func:`pixels`."""
    processor = toy_processor()
    s = data.sample("test", 0)
    inputs = processor(text=[prompt(s.question, s.subject)], images=[s.image],
                       return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    torch.testing.assert_close(pixels([s.image], processor), inputs["pixel_values"])
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, -4:].tolist())
    assert tokens == ["?", "assistant", ":", s.subject]
    assert set(answer_ids()) == set(data.ANSWERS)


def test_encode_at_full_size_is_the_vision_tower() -> None:
    """:func:`encode` of a 336 px image at window (0, 0) equals the CLIP tower's own hidden
    states, and a 12×12 window uses the position embeddings of its place in the 24×24 grid."""
    model = toy_model(seed=0).eval()
    vit = model.model.vision_tower
    pix = pixels([data.sample("test", 1).image], toy_processor())
    with torch.no_grad():
        ours = encode(vit, pix)
        ref = vit(pix, output_hidden_states=True).hidden_states
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    index = window_index(3, 5, 12)
    assert index[0] == 3 * 24 + 5 and index[12] == 4 * 24 + 5 and index.numel() == 144


def test_packed_training_sequence_and_positions() -> None:
    """A training sequence starts like the evaluation prompt, its targets are the replies
    (subject word after "assistant :", answer word, </s>), and window image tokens keep their
    full-layout RoPE positions."""
    vocab = toy_processor().tokenizer.get_vocab()
    scene = data.sample("test", 2).scene
    ids, targets, lookups = packed(scene, np.random.default_rng(0), vocab, 144)
    inv = {i: w for w, i in vocab.items()}
    assert [inv[i] for i in ids[:3]] == ["<s>", "user", ":"]
    assert ids[3:147] == [vocab["<image>"]] * 144
    assert len(targets) == 3 * 4  # one question of each kind
    assert [inv[ids[t]] for t in targets[2::3]] == ["</s>"] * 4
    assert all(inv[ids[t]] in data.ANSWERS for t in targets[1::3])
    assert all(inv[ids[t - 2]] == "assistant" and inv[ids[t - 1]] == ":" for t in targets[::3])
    assert [at for at, _ in lookups] == targets[::3]
    for at, named in lookups:
        one_object = inv[ids[at]] in {*SHAPES, *COLORS}  # colour / position subjects
        assert named == (data.referents(scene, inv[ids[at]]) if one_object else [])
    image = window_index(2, 0, 12)
    pos = positions(len(ids), image)
    assert pos[:3].tolist() == [0, 1, 2] and pos[3].item() == 3 + 2 * 24
    assert pos[147].item() == 3 + 576 and (pos[147:].diff() == 1).all()


# ----------------------------------------------------------------------------- training


def test_vision_targets_pair_and_side() -> None:
    """Patch targets: the owning object's (colour, shape) pair and its side of the full image's
    midline (a window's objects are judged in the full frame), background elsewhere."""
    scene = _scene(("circle", "red", 50, 50), ("square", "blue", 250, 250))
    cls, pair, side = vision_targets([scene])
    red, blue = (pair_index(o) for o in scene.objects)
    at = {name: (y // 14) * 24 + x // 14 for name, x, y in (("red", 50, 50), ("blue", 250, 250))}
    assert pair[0, at["red"]] == red and side[0, at["red"]] == 0
    assert pair[0, at["blue"]] == blue and side[0, at["blue"]] == 1
    assert pair[0, 0] == N_PAIRS and side[0, 0] == IGNORE
    assert int((side[0] != IGNORE).sum()) == int((pair[0] != N_PAIRS).sum()) > 0
    assert cls[0, red] == 1 and cls[0, blue] == 1 and cls[0, :N_PAIRS].sum() == 2
    window = Scene((220, 220, 220), (Shape("circle", "red", 100, 60, 40),), 168, 140)
    _, pair, side = vision_targets([window])
    assert set(side[0][pair[0] != N_PAIRS].tolist()) == {1}


def test_kept_patches_are_objects_plus_a_background_share() -> None:
    """Every object patch is kept, background patches with the given probability, sorted."""
    objects = torch.zeros(576, dtype=torch.bool)
    objects[[5, 100, 101, 400]] = True
    rng = np.random.default_rng(0)
    assert kept_patches(objects, rng, 0.0).tolist() == [5, 100, 101, 400]
    assert kept_patches(objects, rng, 1.0).tolist() == list(range(576))
    some = kept_patches(objects, rng, 0.5)
    assert set(some.tolist()) >= {5, 100, 101, 400} and (some.diff() > 0).all()
    assert 200 < some.numel() < 380


@pytest.fixture(scope="module")
def pool() -> FeaturePool:
    return build_pool(toy_model(seed=0).eval(), toy_processor(), 6, seed=0, progress=False)


def test_feature_pool_is_the_vision_towers_feature_layer(pool: FeaturePool) -> None:
    """Pool features are the tower's own feature-layer patch tokens (float16); odd entries are
    1–3-object scenes, even ones 3–6; `objects` marks the patches holding object pixels."""
    model = toy_model(seed=0).eval()
    with torch.no_grad():
        states = model.model.vision_tower(pixels([render(s) for s in pool.scenes],
                                                 toy_processor()), output_hidden_states=True)
    ref = states.hidden_states[model.config.vision_feature_layer][:, 1:]
    torch.testing.assert_close(pool.features.float(), ref, atol=2e-2, rtol=2e-3)
    assert all(1 <= len(s.objects) <= 3 for s in pool.scenes[1::2])
    assert all(3 <= len(s.objects) <= 6 for s in pool.scenes[0::2])
    mask = shape_mask(pool.scenes[0]).reshape(24, 14, 24, 14).any(axis=(1, 3)).reshape(-1)
    assert pool.objects[0].tolist() == mask.tolist()


def test_language_batch_keeps_object_tokens_at_their_positions(pool: FeaturePool) -> None:
    """Without background a row's image tokens are exactly its scene's object patches, at RoPE
    positions 3 + raster index; text follows at 3 + 576; each subject word's look-up marks the
    image tokens of the objects it names (colour and position questions only); `small_share`
    picks small (odd) or full (even) scenes; without a background range every row holds all 576
    tokens."""
    vocab = toy_processor().tokenizer.get_vocab()
    inv = {i: w for w, i in vocab.items()}
    image_id = vocab["<image>"]
    batch = language_batch(pool, vocab, np.random.default_rng(1), 4, 1.0, (0.0, 0.0), 2)
    assert all(i % 2 == 1 for i in batch.scenes)
    for b, (i, kept) in enumerate(zip(batch.scenes, batch.patches)):
        assert kept.tolist() == torch.nonzero(pool.objects[i]).flatten().tolist()
        is_image = batch.input_ids[b] == image_id
        assert int(is_image.sum()) == kept.numel()
        assert batch.position_ids[b][is_image].tolist() == (3 + kept).tolist()
        first_text = 3 + kept.numel()
        assert batch.position_ids[b, first_text].item() == 3 + 576
    for b, (i, kept) in enumerate(zip(batch.scenes, batch.patches)):
        owners = pool.owners[i][kept]
        for q in range(batch.queries.shape[1]):
            at = batch.queries[b, q].item()
            if at == 0:
                assert not batch.lookup[b, q].any()
                continue
            subject = inv[batch.input_ids[b, at].item()]
            named = data.referents(pool.scenes[i], subject)
            supervised = subject in {*SHAPES, *COLORS}
            expect = [3 + j for j, o in enumerate(owners.tolist()) if o in named and supervised]
            assert torch.nonzero(batch.lookup[b, q]).flatten().tolist() == expect
    answers = batch.input_ids[batch.target_rows, batch.target_cols][1::3].tolist()
    assert all(inv[a] in data.ANSWERS for a in answers)
    full = language_batch(pool, vocab, np.random.default_rng(1), 2, 0.0, None, 1)
    assert all(i % 2 == 0 for i in full.scenes)
    assert ((full.input_ids == image_id).sum(-1) == 576).all()


def test_referents_of_each_subject_kind() -> None:
    """Shape and plural name every object of the shape, a colour every object of the colour, a
    pair word its one object; unknown words are a ValueError naming the parameter."""
    scene = _scene(("circle", "red", 50, 50), ("circle", "blue", 250, 250),
                   ("square", "red", 160, 100))
    assert data.referents(scene, "circle") == data.referents(scene, "circles") == [0, 1]
    assert data.referents(scene, "red") == [0, 2]
    assert data.referents(scene, "blue-circle") == [1]
    assert data.referents(scene, "green-square") == [] == data.referents(scene, "triangles")
    with pytest.raises(ValueError, match="subject"):
        data.referents(scene, "left")


def test_lookup_loss_is_minus_log_mass_on_named_tokens() -> None:
    """-log of the attention mass on the named tokens, averaged over heads and the look-ups
    that name something; look-ups naming nothing are left out."""
    attention = torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]],
                              [[[0.2, 0.2, 0.6], [1.0, 0.0, 0.0]]]])  # (B=2, H=1, Q=2, L=3)
    lookup = torch.tensor([[[True, True, False], [False, False, False]],
                           [[False, False, True], [False, True, False]]])
    expect = -(np.log(0.75) + np.log(0.6) + np.log(1e-6)) / 3
    assert lookup_loss(attention, lookup).item() == pytest.approx(expect, rel=1e-5)
    assert lookup_loss(attention, torch.zeros_like(lookup)).item() == 0.0


def test_small_scene_share_schedule() -> None:
    """1 until `small_until`, linear to `small_share_final` over `small_decay` steps, 0 once
    the full-image steps start."""
    cfg = TrainConfig(lm_steps=40, small_until=10, small_decay=10, small_share_final=0.3)
    shares = [small_share(cfg, s) for s in (0, 10, 15, 20, 39, 40)]
    assert shares == pytest.approx([1.0, 1.0, 0.65, 0.3, 0.3, 0.0])


def test_interrupted_training_resumes_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both stages on a few steps: a run interrupted in stage 2 and started again from its
    `state.pt` ends with the weights of an uninterrupted run (seeded steps, saved optimizer,
    rebuilt feature pool)."""
    from vlprune.eval.toy import train as train_module

    cfg = TrainConfig(threads=1, vision_window_steps=2, vision_full_steps=1, vision_batch=2,
                      vision_full_batch=2, pool_scenes=4, lm_steps=3, lm_full_steps=1,
                      lm_batch=2, lm_full_batch=1, checkpoint_every=2, eval_every=1000,
                      eval_samples=4)
    straight, _ = train_module.train(cfg, tmp_path / "a")
    step = train_module._language_step

    def interrupted(run, opt, i):
        if i == 3:
            raise KeyboardInterrupt
        return step(run, opt, i)

    monkeypatch.setattr(train_module, "_language_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, tmp_path / "b")
    monkeypatch.setattr(train_module, "_language_step", step)
    resumed, log = train_module.train(cfg, tmp_path / "b")
    assert [e["step"] for e in log if e["stage"] == "language" and "loss" in e] == [2, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_language_loss_adds_the_lookup_loss_of_eager_attention(pool: FeaturePool) -> None:
    """With ``lookup_heads`` the loss grows by exactly the look-up loss computed from the first
    layer's eager attention weights (the probe recomputes only the subject rows, with grad),
    and that term trains the first layer's query projection."""
    vocab = toy_processor().tokenizer.get_vocab()
    batch = language_batch(pool, vocab, np.random.default_rng(3), 3, 0.5, (0.1, 0.1), 1)
    model = toy_model(seed=0)
    plain, correct = language_loss(model, pool, batch)
    with_lookup, _ = language_loss(model, pool, batch, lookup_heads=2)
    assert correct.shape == batch.target_rows.shape

    eager = toy_model(seed=0)
    eager.set_attn_implementation("eager")
    kept = torch.cat([pool.features[i][p] for i, p in zip(batch.scenes, batch.patches)])
    embeds = eager.get_input_embeddings()(batch.input_ids)
    is_image = (batch.input_ids == eager.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, eager.model.multi_modal_projector(kept.float()))
    with torch.no_grad():
        weights = eager(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, output_attentions=True).attentions[0]
    index = batch.queries[:, None, :, None].expand(-1, weights.shape[1], -1, weights.shape[-1])
    rows = weights.gather(2, index)[:, :2]
    expect = lookup_loss(rows, batch.lookup)
    torch.testing.assert_close(with_lookup - plain, expect, atol=1e-4, rtol=1e-4)
    (with_lookup - plain).backward()
    q_proj = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
