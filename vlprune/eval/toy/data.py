"""Synthetic visual QA rendered with PIL: questions about coloured shapes on a plain background.

The scenes (3 to 6 shapes, each covering a few of the 576 patches) are drawn by
:mod:`~vlprune.eval.toy.scenes` and rendered by :mod:`~vlprune.eval.toy.drawing`. Every sample
is a pure function of ``(split, index)``: the random generator is seeded with
``(SPLIT_SEEDS[split], index)``, so a sample never depends on which other samples were drawn and
the splits never share a generator stream (the held-out split is ``"test"``).

Question kinds (``KINDS``, balanced: kind = ``KINDS[index % 4]``):

- ``color``: "what color is the circle ?" about a shape drawn exactly once → a colour;
- ``count``: "how many circles are there ?" → "0" .. "6";
- ``presence`` (POPE-style): "is there a red circle ?" → yes / no, half of each; the absent
  pair shares its shape or its colour with a drawn object (adversarial negatives);
- ``position``: "is the red circle on the left or right ?" → left / right of the image's
  vertical midline, the centre at least ``MIN_DX`` px from it, the colour unique in the scene.

Every question has a ``subject``: the one word the assistant's reply starts with, naming what
the answer is about, then the one-word answer (``ANSWERS``). Each kind has its own kind of
subject, so the subject alone says what to look up and what kind of answer follows: a shape
("circle", colour questions), a plural ("circles", count), a pair word ("red-circle",
presence), a colour ("red", position: asked only of an object whose colour is unique).

The toy model is trained to produce both (a one-word chain of thought: a model trained from
scratch in minutes cannot route a question's words to the answer position through 576 image
tokens, but it can look up the image with the word it is reading); the benchmark puts the
subject in the prompt and scores the next word.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlprune.eval.toy.drawing import render
from vlprune.eval.toy.scenes import (
    COLORS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    PAIR_WORDS,
    SHAPES,
    Scene,
    make_scene,
    pair_word,
)

__all__ = [
    "ANSWERS",
    "KINDS",
    "PLURALS",
    "SPLIT_SEEDS",
    "QASample",
    "ask",
    "generator",
    "referents",
    "sample",
    "samples",
    "scene_with_questions",
]

PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"
}
KINDS: tuple[str, ...] = ("color", "count", "presence", "position")
SPLIT_SEEDS: dict[str, int] = {"train": 11, "val": 12, "test": 13}
MIN_DX = 20
ANSWERS: tuple[str, ...] = (
    *COLORS, *(str(n) for n in range(MAX_OBJECTS + 1)), "yes", "no", "left", "right"
)


@dataclass(frozen=True)
class QASample:
    """A rendered image with one question, its ``subject`` word, its one-word answer and its
    ``kind``."""

    image: Image.Image
    question: str
    subject: str
    answer: str
    kind: str
    scene: Scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """A (question, subject, answer) of ``kind`` about ``scene``, or None when the scene has
    none (see the module docstring)."""
    objects = scene.objects
    counts = Counter(o.kind for o in objects)
    if kind == "color":
        unique = [o for o in objects if counts[o.kind] == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what color is the {o.kind} ?", o.kind, o.color
    if kind == "count":
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"how many {PLURALS[s]} are there ?", PLURALS[s], str(counts[s])
    if kind == "presence":
        if rng.random() < 0.5:
            o = objects[int(rng.integers(len(objects)))]
            return f"is there {_article(o.color)} {o.name} ?", o.word, "yes"
        drawn = {(o.color, o.kind) for o in objects}
        near = sorted(
            (c, s) for c in COLORS for s in SHAPES
            if (c, s) not in drawn and any(c == o.color or s == o.kind for o in objects)
        )
        c, s = near[int(rng.integers(len(near)))]
        return f"is there {_article(c)} {c} {s} ?", pair_word(c, s), "no"
    if kind == "position":
        middle = IMAGE_SIZE / 2 - scene.x0
        colors = Counter(o.color for o in objects)
        sided = [o for o in objects if abs(o.x - middle) >= MIN_DX and colors[o.color] == 1]
        if not sided:
            return None
        o = sided[int(rng.integers(len(sided)))]
        return f"is the {o.name} on the left or right ?", o.color, (
            "left" if o.x < middle else "right"
        )
    raise ValueError(f"unknown question `kind` {kind!r}; expected one of {KINDS}")


def referents(scene: Scene, subject: str) -> list[int]:
    """Indices in ``scene.objects`` of the objects a reply's ``subject`` word names: a shape
    (colour questions) or plural (count) names every object of that shape, a pair word
    (presence) the object of that colour and shape, a colour (position) every object of that
    colour; empty when none is drawn."""
    shapes = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
    if subject in shapes:
        return [i for i, o in enumerate(scene.objects) if o.kind == shapes[subject]]
    if subject in COLORS:
        return [i for i, o in enumerate(scene.objects) if o.color == subject]
    if subject in PAIR_WORDS:
        return [i for i, o in enumerate(scene.objects) if o.word == subject]
    raise ValueError(f"unknown `subject` {subject!r}: not a shape, plural, colour or pair word")


def generator(split: str, *key: int) -> np.random.Generator:
    """The random generator of ``split`` for the non-negative integer ``key`` (a sample index,
    or a longer key for training streams: keys of different lengths never share a stream)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown `split` {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    if any(k < 0 for k in key):
        raise ValueError(f"generator keys must be ≥ 0, got {key}")
    return np.random.default_rng((SPLIT_SEEDS[split], *key))


def scene_with_questions(
    split: str, index: int, kinds: tuple[str, ...]
) -> tuple[Scene, list[tuple[str, str, str, str]]]:
    """Scene ``index`` of ``split`` with one (question, subject, answer, kind) per entry of
    ``kinds``; scenes are redrawn (same generator) until every kind has a question."""
    rng = generator(split, index)
    while True:
        scene = make_scene(rng)
        qas = [ask(scene, kind, rng) for kind in kinds]
        if all(qa is not None for qa in qas):
            return scene, [(*qa, k) for qa, k in zip(qas, kinds)]  # type: ignore[misc]


def sample(split: str, index: int) -> QASample:
    """Sample ``index`` of ``split``: question kind ``KINDS[index % 4]``."""
    scene, [(question, subject, answer, kind)] = scene_with_questions(
        split, index, (KINDS[index % len(KINDS)],)
    )
    return QASample(render(scene), question, subject, answer, kind, scene)


def samples(
    split: str, n: int, start: int = 0, kinds: Sequence[str] | None = None
) -> list[QASample]:
    """The first ``n`` samples of ``split`` from index ``start`` on, keeping only questions of
    ``kinds`` (default: all; a sample's kind is ``KINDS[index % 4]``)."""
    kinds = KINDS if kinds is None else tuple(kinds)
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"unknown question `kinds` {sorted(unknown)}; expected some of {KINDS}")
    chosen = (i for i in itertools.count(start) if KINDS[i % len(KINDS)] in kinds)
    return [sample(split, i) for i in itertools.islice(chosen, n)]
