"""The toy scenes: coloured shapes placed on a plain background (what is drawn, not how).

A scene holds 3 to 6 shapes (``SHAPES`` × ``COLORS``, every (colour, shape) pair at most once)
of 34 to 38 px on a 336×336 canvas, i.e. 2.5 patches of 14 px across (9 to 16 patches each):
each answer depends on a few of the 576 patches. Sizes vary little so that an object's patch
count says how many objects there are (with 28–42 px, one large object covers as many patches
as two small ones and the toy model miscounted). Pixels and patches of a scene:
:mod:`~vlprune.eval.toy.drawing`; questions about it: :mod:`~vlprune.eval.toy.data`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "PAIR_WORDS",
    "SHAPES",
    "Scene",
    "Shape",
    "make_scene",
    "pair_index",
    "pair_word",
    "scene_labels",
]

IMAGE_SIZE = 336
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (140, 55, 185),
    "orange": (240, 130, 25),
}
MIN_OBJECTS, MAX_OBJECTS = 3, 6
MIN_SIZE, MAX_SIZE = 34, 38
MARGIN = 6
PAIR_WORDS: tuple[str, ...] = tuple(f"{c}-{s}" for c in COLORS for s in SHAPES)


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
