"""The toy scenes as pixels and patches: the PIL rendering of a
:class:`~vlprune.eval.toy.scenes.Scene`, its object mask, and which of the 14 px patches its
objects touch or cover (the targets of the toy model's training).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vlprune.eval.toy.scenes import COLORS, Scene, Shape

__all__ = ["patch_objects", "render", "shape_mask", "touched_patches"]


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
