"""Stage 1 of the toy training: the CLIP ViT learns what CLIP-based VLMs rely on.

Objectives (:func:`vision_loss`):

- **CLS** (multi-label, binary cross-entropy): a linear head on the pooled CLS state predicts
  which (colour, shape) pairs, shapes and colours are in the image, so the CLS token must gather
  the object patches: its attention at the last layers concentrates on objects, as in CLIP;
- **pair** and **shape** (dense): each patch token of LLaVA's feature layer predicts its
  object's (colour, shape) pair, or background, and (weight ``shape_weight``) its object's
  shape alone: shape is what the 64-wide ViT gets wrong (colour it never does), and the extra
  target lifts whole-object shape accuracy;
- **side** (dense, weight ``side_weight``): each object patch predicts whether its object is left
  or right of the image's vertical midline. Without it the learned position embeddings never
  become separable by side and left / right questions stay at chance; at weight 1 it costs shape
  accuracy; at 0.1 the side signal is weak and position questions stayed at chance for one
  seed in two; 0.3 learns them for both (measured while training the shipped checkpoint).

Most steps see a 168×168 scene (1–3 objects) placed at a random window of the 24×24 patch grid,
i.e. 144 of the 576 tokens, each with the position embedding of its place in a full image
(:func:`encode`, FLIP-style token dropping, nothing interpolated); the last steps see full
336×336 scenes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from vlprune.eval.toy import data
from vlprune.eval.toy.drawing import patch_objects
from vlprune.eval.toy.model import PATCH_SIZE
from vlprune.eval.toy.scenes import (
    COLORS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    MIN_OBJECTS,
    SHAPES,
    Scene,
    make_scene,
    pair_index,
    scene_labels,
)

__all__ = [
    "GRID",
    "VisionHeads",
    "encode",
    "pixels",
    "training_scenes",
    "vision_loss",
    "vision_targets",
    "window_index",
]

GRID = IMAGE_SIZE // PATCH_SIZE
WINDOW = 12
WINDOW_OBJECTS = (1, 3)
N_PAIRS = len(COLORS) * len(SHAPES)
IGNORE = -100


def pixels(images: list[Any], processor: Any) -> torch.Tensor:
    """(B, 3, H, W) CLIP-normalised pixels of same-size RGB images; for 336×336 images this is
    exactly the processor's ``pixel_values`` (its resize and centre crop are identities)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
    return (arr.permute(0, 3, 1, 2) * ip.rescale_factor - mean) / std


def window_index(row: int, col: int, side: int) -> torch.Tensor:
    """(side²,) raster indices in the 24×24 grid of a side×side window at patch (row, col)."""
    return torch.arange(GRID * GRID).view(GRID, GRID)[row : row + side, col : col + side].flatten()


def encode(vit: nn.Module, pixel_values: torch.Tensor, row: int = 0, col: int = 0) -> list:
    """Hidden states of the CLIP ``vit`` (after pre-layernorm, then after each layer; each
    (B, 1 + n², D), CLS first) for images of n×n patches placed at patch (``row``, ``col``) of
    the 24×24 grid: the patches get the position embeddings of that window (FLIP-style token
    dropping, no interpolation). A full 336 px image at (0, 0) gives the model's own states."""
    emb = vit.embeddings
    patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    side = pixel_values.shape[-1] // emb.patch_size
    pos = emb.position_embedding.weight
    cls = (emb.class_embedding + pos[0]).expand(len(pixel_values), 1, -1)
    hidden = vit.pre_layrnorm(
        torch.cat([cls, patches + pos[window_index(row, col, side) + 1]], dim=1)
    )
    states = [hidden]
    for layer in vit.encoder.layers:
        hidden = layer(hidden, None)
        states.append(hidden)
    return states


def training_scenes(
    seed: int, stage: int, step: int, size: int, full: bool
) -> tuple[list[Scene], int, int]:
    """``size`` training scenes of ``stage`` at ``step`` (full 336 px with 3–6 objects, or one
    168 px window with 1–3 objects) and the window's patch offset (row, col)."""
    rng = data.generator("train", seed, stage, step)
    row, col = (0, 0) if full else (int(v) for v in rng.integers(0, GRID - WINDOW + 1, 2))
    canvas = IMAGE_SIZE if full else WINDOW * PATCH_SIZE
    n_objects = (MIN_OBJECTS, MAX_OBJECTS) if full else WINDOW_OBJECTS
    scenes = [
        make_scene(data.generator("train", seed, stage, step, i),
                   canvas=canvas, n_objects=n_objects, x0=col * PATCH_SIZE)
        for i in range(size)
    ]
    return scenes, row, col


class VisionHeads(nn.Module):
    """Stage-1 heads: ``cls`` on the pooled CLS state → 24 (colour, shape) pairs + 4 shapes +
    6 colours present (multi-label); on each feature-layer patch token ``pair`` → its object's
    pair or background (25 classes), ``shape`` → its object's shape or background (5), and
    ``side`` (object patches) → left / right."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cls = nn.Linear(hidden, N_PAIRS + len(SHAPES) + len(COLORS))
        self.pair = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, N_PAIRS + 1))
        self.shape = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(SHAPES) + 1))
        self.side = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))


def vision_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 34) float CLS targets, (B, n²) long pair targets (24 = background) and (B, n²) long
    side targets (0 left, 1 right of the full image's midline; ``IGNORE`` on background)."""
    pairs = np.stack([scene_labels(s) for s in scenes])
    grid = pairs.reshape(len(scenes), len(COLORS), len(SHAPES))
    cls = np.concatenate([pairs, grid.max(axis=1), grid.max(axis=2)], axis=1)
    pair_rows, side_rows = [], []
    for scene in scenes:
        owner = patch_objects(scene, PATCH_SIZE)
        pair = np.array([*(pair_index(o) for o in scene.objects), N_PAIRS])
        side = np.array([*(int(o.x + scene.x0 >= IMAGE_SIZE / 2) for o in scene.objects), IGNORE])
        pair_rows.append(pair[owner])
        side_rows.append(side[owner])
    return (torch.from_numpy(cls), torch.from_numpy(np.stack(pair_rows)),
            torch.from_numpy(np.stack(side_rows)))


def vision_loss(
    model: LlavaForConditionalGeneration,
    heads: VisionHeads,
    states: list[torch.Tensor],
    scenes: list[Scene],
    side_weight: float,
    shape_weight: float = 1.0,
) -> torch.Tensor:
    """CLS multi-label loss + dense pair loss + ``shape_weight`` × dense shape loss +
    ``side_weight`` × dense side loss, the dense ones on LLaVA's feature layer
    (``vision_feature_layer``, CLS dropped)."""
    cls_target, pair_target, side_target = vision_targets(scenes)
    vit = model.model.vision_tower
    cls_logits = heads.cls(vit.post_layernorm(states[-1][:, 0]))
    feature = states[model.config.vision_feature_layer][:, 1:]
    ce = nn.functional.cross_entropy
    n_shapes = len(SHAPES)
    shape_target = torch.where(pair_target == N_PAIRS, n_shapes, pair_target % n_shapes)
    return (
        nn.functional.binary_cross_entropy_with_logits(cls_logits, cls_target)
        + ce(heads.pair(feature).flatten(0, 1), pair_target.flatten())
        + shape_weight * ce(heads.shape(feature).flatten(0, 1), shape_target.flatten())
        + side_weight * ce(heads.side(feature).flatten(0, 1), side_target.flatten(),
                           ignore_index=IGNORE)
    )
