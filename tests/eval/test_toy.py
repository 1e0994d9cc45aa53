"""The toy VLM benchmark: deterministic synthetic QA, the toy LLaVA's processor and training
helpers, and the shipped checkpoint (accuracy reproduces; methods beat random at 64 of 576
tokens; keep-all equals the unpruned model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlprune.eval.toy import data
from vlprune.eval.toy.model import (
    WORDS,
    answer_ids,
    prompt,
    toy_model,
    toy_processor,
)
from vlprune.eval.toy.train import _packed, _positions, encode, pixels, window_index

# ----------------------------------------------------------------------------- data


def _scene(*objects: tuple[str, str, int, int]) -> data.Scene:
    """A hand-made scene of (kind, colour, x, y) objects of size 40."""
    return data.Scene((220, 220, 220), tuple(data.Shape(k, c, x, y, 40) for k, c, x, y in objects))


def _answers(scene: data.Scene, kind: str, draws: int = 40) -> set[tuple[str, str, str]]:
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
    shape = data.Shape("circle", "red", 100, 60, 40)
    window = data.Scene((220, 220, 220), (shape,), size=168, x0=140)
    assert data.ask(window, "position", np.random.default_rng(0))[2] == "right"
    assert data.ask(data.Scene((220, 220, 220), (shape,)), "position",
                    np.random.default_rng(0))[2] == "left"


def test_objects_are_separate_and_inside_the_canvas() -> None:
    """Objects never overlap (centre distance ≥ mean size + margin) and stay on the canvas."""
    for i in range(30):
        objects = data.sample("train", i).scene.objects
        assert data.MIN_OBJECTS <= len(objects) <= data.MAX_OBJECTS
        for a in objects:
            assert a.size / 2 <= a.x <= data.IMAGE_SIZE - a.size / 2
            for b in objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) >= (a.size + b.size) / 2 + data.MARGIN


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
    ids, targets = _packed(scene, np.random.default_rng(0), vocab, 144)
    inv = {i: w for w, i in vocab.items()}
    assert [inv[i] for i in ids[:3]] == ["<s>", "user", ":"]
    assert ids[3:147] == [vocab["<image>"]] * 144
    assert len(targets) == 3 * 4  # one question of each kind
    assert [inv[ids[t]] for t in targets[2::3]] == ["</s>"] * 4
    assert all(inv[ids[t]] in data.ANSWERS for t in targets[1::3])
    assert all(inv[ids[t - 2]] == "assistant" and inv[ids[t - 1]] == ":" for t in targets[::3])
    image = window_index(2, 0, 12)
    pos = _positions(len(ids), image)
    assert pos[:3].tolist() == [0, 1, 2] and pos[3].item() == 3 + 2 * 24
    assert pos[147].item() == 3 + 576 and (pos[147:].diff() == 1).all()
