"""Synthetic visual QA rendered with PIL: coloured shapes on a plain background.

Every sample is a pure function of ``(split, index)``: the random generator is seeded with
``(SPLIT_SEEDS[split], index)``, so a sample never depends on which other samples were drawn and
the splits never share a generator stream (the held-out split is ``"test"``).

A scene holds 3 to 6 shapes (``SHAPES`` × ``COLORS``, every (colour, shape) pair at most once)
of 34 to 38 px on a 336×336 canvas, i.e. 2.5 patches of 14 px across (9 to 16 patches each):
each answer depends on a few of the 576 patches. Sizes vary little so that an object's patch
count says how many objects there are (with 28–42 px, one large object covers as many patches
as two small ones and the toy model miscounted). Question kinds (``KINDS``, balanced: kind =
``KINDS[index % 4]``):

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
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "COLORS",
    "IMAGE_SIZE",
    "KINDS",
    "PAIR_WORDS",
    "PLURALS",
    "SHAPES",
    "SPLIT_SEEDS",
    "QASample",
    "Scene",
    "Shape",
    "ask",
    "generator",
    "make_scene",
    "pair_index",
    "pair_word",
    "patch_objects",
    "referents",
    "render",
    "sample",
    "samples",
    "scene_labels",
    "scene_with_questions",
    "shape_mask",
    "touched_patches",
]

IMAGE_SIZE = 336
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (140, 55, 185),
    "orange": (240, 130, 25),
}
KINDS: tuple[str, ...] = ("color", "count", "presence", "position")
SPLIT_SEEDS: dict[str, int] = {"train": 11, "val": 12, "test": 13}
MIN_OBJECTS, MAX_OBJECTS = 3, 6
MIN_SIZE, MAX_SIZE = 34, 38
MARGIN = 6
MIN_DX = 20
PAIR_WORDS: tuple[str, ...] = tuple(f"{c}-{s}" for c in COLORS for s in SHAPES)
ANSWERS: tuple[str, ...] = (
    *COLORS, *(str(n) for n in range(MAX_OBJECTS + 1)), "yes", "no", "left", "right"
)


@dataclass(frozen=True)
class Shape:
    """One drawn object: ``kind`` in ``SHAPES``, ``color`` in ``COLORS``, centre (x, y) and
    bounding-box side ``size`` in pixels."""

    kind: str
    color: str
    x: int
    y: int
    size: int

    @property
    def name(self) -> str:
        """"red circle"."""
        return f"{self.color} {self.kind}"

    @property
    def word(self) -> str:
        """"red-circle": the object as one vocabulary word (:func:`pair_word`)."""
        return pair_word(self.color, self.kind)


@dataclass(frozen=True)
class Scene:
    """Background colour, the objects in drawing order, the canvas side in pixels, and the
    canvas's left edge ``x0`` in the full ``IMAGE_SIZE`` frame (non-zero only for the training
    windows of :mod:`~vlprune.eval.toy.train`; left / right are judged in that frame)."""

    background: tuple[int, int, int]
    objects: tuple[Shape, ...]
    size: int = IMAGE_SIZE
    x0: int = 0


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


def _place(
    rng: np.random.Generator, placed: list[Shape], size: int, canvas: int
) -> tuple[int, int] | None:
    half = size / 2
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(math.ceil(half) + 2, canvas - half - 2, 2))
        if all(math.hypot(x - o.x, y - o.y) >= (size + o.size) / 2 + MARGIN for o in placed):
            return x, y
    return None


def make_scene(
    rng: np.random.Generator,
    *,
    canvas: int = IMAGE_SIZE,
    n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
    x0: int = 0,
) -> Scene:
    """Draw a background grey and ``n_objects`` (min, max) non-overlapping objects with distinct
    (colour, shape) on a ``canvas``-pixel square whose left edge is at ``x0`` in the full frame
    (an object that finds no room is left out)."""
    grey = int(rng.integers(190, 236))
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-8, 9, 3))
    n_objects = int(rng.integers(n_objects[0], n_objects[1] + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n_objects, replace=False)
    objects: list[Shape] = []
    for i in chosen:
        color, kind = pairs[int(i)]
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        centre = _place(rng, objects, size, canvas)
        if centre is not None:
            objects.append(Shape(kind, color, *centre, size))
    return Scene(background, tuple(objects), canvas, x0)  # type: ignore[arg-type]


def _outline(shape: Shape) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    h = shape.size / 2
    x, y = shape.x, shape.y
    if shape.kind == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    return (x - h, y - h, x + h, y + h)


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill: tuple[int, int, int] | int) -> None:
    box = _outline(shape)
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    elif shape.kind == "triangle":
        draw.polygon(box, fill=fill)
    else:  # cross: a plus sign with arms a third of the size wide
        x, y, t = shape.x, shape.y, shape.size / 6
        h = shape.size / 2
        draw.rectangle((x - h, y - t, x + h, y + t), fill=fill)
        draw.rectangle((x - t, y - h, x + t, y + h), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image (336×336 unless the scene's canvas is another size)."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.objects:
        _draw(draw, shape, COLORS[shape.color])
    return image


def shape_mask(scene: Scene) -> np.ndarray:
    """(size, size) bool: pixels covered by any object."""
    mask = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(mask)
    for shape in scene.objects:
        _draw(draw, shape, 255)
    return np.asarray(mask) > 0


def touched_patches(scene: Scene, patch: int = 14) -> np.ndarray:
    """(n²,) bool, raster order over the n×n patches: patches holding any object pixel."""
    n = scene.size // patch
    return shape_mask(scene).reshape(n, patch, n, patch).any(axis=(1, 3)).reshape(-1)


def patch_objects(scene: Scene, patch: int = 14, min_cover: float = 0.25) -> np.ndarray:
    """(n²,) int, raster order over the n×n patches: the index in ``scene.objects`` of the
    object covering most of each patch if it covers at least ``min_cover`` of it, else -1."""
    n = scene.size // patch
    best = np.full(n * n, min_cover)
    owner = np.full(n * n, -1)
    for i, shape in enumerate(scene.objects):
        mask = Image.new("L", (scene.size, scene.size), 0)
        _draw(ImageDraw.Draw(mask), shape, 255)
        cover = (np.asarray(mask) > 0).reshape(n, patch, n, patch).mean(axis=(1, 3)).reshape(-1)
        owner[cover >= best] = i
        best = np.maximum(best, cover)
    return owner


def pair_index(shape: Shape) -> int:
    """Index of the object's (colour, shape) pair: ``color_index * len(SHAPES) + shape_index``."""
    return list(COLORS).index(shape.color) * len(SHAPES) + SHAPES.index(shape.kind)


def pair_word(color: str, kind: str) -> str:
    """The vocabulary word of a (colour, shape) pair: ``pair_word("red", "circle")`` →
    "red-circle"."""
    return f"{color}-{kind}"


def scene_labels(scene: Scene) -> np.ndarray:
    """(len(COLORS) * len(SHAPES),) float multi-hot: which (colour, shape) pairs are drawn
    (indexed by :func:`pair_index`)."""
    labels = np.zeros(len(COLORS) * len(SHAPES), dtype=np.float32)
    for o in scene.objects:
        labels[pair_index(o)] = 1.0
    return labels


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
