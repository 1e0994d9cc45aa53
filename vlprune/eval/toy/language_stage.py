"""Stage 2 of the toy training: projector + language model on the QA data, ViT frozen.

The frozen ViT's features (LLaVA's: penultimate layer, CLS dropped) are computed once for a
pool of training scenes (:class:`FeaturePool`), so a step costs only the projector and the LLM.
A step's sequence asks ``per_kind`` questions of each kind about one scene
(``<s> user : <image> q1 assistant : subject1 answer1 </s> user : q2 ...``); the loss is on the
replies (subject word, answer word, ``</s>``).

Speed without a shortcut: most steps feed the LLM every patch that touches an object plus a
random fraction of the background patches (:func:`kept_patches`), each at the RoPE position it
has in the full 576-token layout; the scene is a full 336 px scene, so left / right cannot be
read off where the tokens sit. Early steps draw mostly 1–3-object scenes (the model learns to
look objects up where few compete), later ones mostly 3–6-object scenes, and the last steps see
all 576 tokens of 3–6-object scenes, the geometry the model is evaluated on.

Look-up supervision (:func:`lookup_loss`): the first heads of the LLM's first layer are taught
to attend, from each reply's subject word, to the image tokens of the objects the word names.
Without it the small LLM learns these look-ups too slowly and too softly within the budget
(with several objects a soft look-up mixes their sides and colours, as measured while
training the shipped checkpoint); the answer itself is still learnt from the answer loss
alone, and every other head is free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlprune.eval.toy import data
from vlprune.eval.toy.drawing import patch_objects, render, touched_patches
from vlprune.eval.toy.model import PATCH_SIZE
from vlprune.eval.toy.scenes import MAX_OBJECTS, MIN_OBJECTS, Scene, make_scene
from vlprune.eval.toy.vision_stage import GRID, encode, pixels
from vlprune.hooks.signals import TextAttentionProbe

__all__ = [
    "LOOKUP_KINDS",
    "SMALL_OBJECTS",
    "FeaturePool",
    "LanguageBatch",
    "Packed",
    "answer_accuracy",
    "build_pool",
    "kept_patches",
    "language_batch",
    "language_loss",
    "lookup_loss",
    "packed",
    "positions",
]

LOOKUP_KINDS = ("color", "position")
"""Question kinds whose look-up is supervised: their subject names exactly one object, whose
colour or side is the answer, and a soft look-up that mixes several objects gets them wrong.
Count and presence need the evidence of several objects, or of none (no circle, an absent
pair), and are left to the free heads (a variant that let their look-up rest on ``<s>``
trained head 0 to put all of it there, i.e. taught nothing)."""

SMALL_OBJECTS = (1, 3)
"""Objects in the pool's small scenes (its odd entries); even entries hold 3–6."""


@dataclass
class FeaturePool:
    """Training scenes with their frozen ViT features: ``features`` (N, 576, D) float16,
    ``objects`` (N, 576) bool: the patches that touch an object, ``owners`` (N, 576) long: the
    object each patch shows (:func:`~vlprune.eval.toy.drawing.patch_objects`, -1 background)."""

    scenes: list[Scene]
    features: torch.Tensor
    objects: torch.Tensor
    owners: torch.Tensor

    def __len__(self) -> int:
        return len(self.scenes)


@torch.no_grad()
def build_pool(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    size: int,
    seed: int,
    batch: int = 32,
    progress: bool = True,
) -> FeaturePool:
    """``size`` full 336 px training scenes (odd entries 1–3 objects, even ones 3–6) and their
    feature-layer patch tokens under ``model``'s vision tower."""
    if size < 2:
        raise ValueError(f"`size` must be ≥ 2 (small and full scenes), got {size}")
    scenes = [
        make_scene(data.generator("train", seed, 4, i),
                   n_objects=SMALL_OBJECTS if i % 2 else (MIN_OBJECTS, MAX_OBJECTS))
        for i in range(size)
    ]
    vit = model.model.vision_tower
    layer = model.config.vision_feature_layer
    features = torch.empty(size, GRID * GRID, vit.config.hidden_size, dtype=torch.float16)
    for start in tqdm(range(0, size, batch), desc="feature pool", disable=not progress):
        chunk = scenes[start : start + batch]
        states = encode(vit, pixels([render(s) for s in chunk], processor))
        features[start : start + len(chunk)] = states[layer][:, 1:].half()
    objects = torch.from_numpy(np.stack([touched_patches(s, PATCH_SIZE) for s in scenes]))
    owners = torch.from_numpy(np.stack([patch_objects(s, PATCH_SIZE) for s in scenes]))
    return FeaturePool(scenes, features, objects, owners.long())


def kept_patches(objects: torch.Tensor, rng: np.random.Generator, fraction: float) -> torch.Tensor:
    """Sorted raster indices of the patches fed to the LLM: every patch in ``objects`` (576,)
    bool plus each other patch with probability ``fraction``."""
    background = torch.from_numpy(rng.random(objects.numel()) < fraction)
    return torch.nonzero(objects | background).flatten()


class Packed(NamedTuple):
    """One training sequence: token ``ids``, the indices of its ``targets`` (per reply: subject
    word, answer word, ``</s>``) and per reply its look-up: (position of the subject word,
    indices of the scene objects the subject names, :func:`~vlprune.eval.toy.data.referents`;
    empty outside ``LOOKUP_KINDS``)."""

    ids: list[int]
    targets: list[int]
    lookups: list[tuple[int, list[int]]]


def packed(
    scene: Scene, rng: np.random.Generator, vocab: dict[str, int], n_image: int,
    per_kind: int = 1, kinds: tuple[str, ...] = data.KINDS,
) -> Packed:
    """The sequence asking ``per_kind`` questions of each of ``kinds`` about ``scene`` (in
    random order, kinds without a question skipped) after ``n_image`` image tokens."""
    ids = [vocab["<s>"], vocab["user"], vocab[":"], *[vocab["<image>"]] * n_image]
    targets: list[int] = []
    lookups: list[tuple[int, list[int]]] = []
    for kind in rng.permutation(np.repeat(kinds, per_kind)):
        qa = data.ask(scene, str(kind), rng)
        if qa is None:
            continue
        question, subject, answer = qa
        if targets:
            ids += [vocab["user"], vocab[":"]]
        ids += [vocab[w] for w in question.split()] + [vocab["assistant"], vocab[":"]]
        targets += [len(ids), len(ids) + 1, len(ids) + 2]
        named = data.referents(scene, subject) if kind in LOOKUP_KINDS else []
        lookups.append((len(ids), named))
        ids += [vocab[subject], vocab[answer], vocab["</s>"]]
    return Packed(ids, targets, lookups)


def positions(length: int, image: torch.Tensor) -> torch.Tensor:
    """(length,) RoPE positions of a sequence ``<s> user : [image tokens] text``: the image
    tokens keep their places ``image`` (raster indices) in the full 576-token layout, the text
    after them starts at 3 + 576, as in a full prompt (and as pruned prompts keep them)."""
    n = image.numel()
    text = torch.arange(3 + GRID * GRID, 3 + GRID * GRID + length - 3 - n)
    return torch.cat([torch.arange(3), 3 + image, text])


@dataclass
class LanguageBatch:
    """One stage-2 batch: right-padded ``input_ids`` / ``attention_mask`` / ``position_ids``
    (B, L), the pool ``scenes`` and kept ``patches`` of each row, the (row, column) of every
    target token, and the look-ups: ``queries`` (B, Q) the subject words' positions (0 pads),
    ``lookup`` (B, Q, L) bool the image tokens showing what each subject names (all False
    outside ``LOOKUP_KINDS``, and for padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    scenes: list[int]
    patches: list[torch.Tensor]
    target_rows: torch.Tensor
    target_cols: torch.Tensor
    queries: torch.Tensor
    lookup: torch.Tensor


def language_batch(
    pool: FeaturePool,
    vocab: dict[str, int],
    rng: np.random.Generator,
    batch: int,
    small_share: float,
    background: tuple[float, float] | None,
    per_kind: int,
) -> LanguageBatch:
    """Draw ``batch`` pool scenes (a ``small_share`` of them small), their kept patches
    (``background``: the (min, max) range the kept background fraction is drawn from; None:
    all 576) and their packed questions."""
    small = rng.random(batch) < small_share
    scenes = [int(2 * i + s) for i, s in zip(rng.integers(0, len(pool) // 2, batch), small)]
    patches = [
        torch.arange(GRID * GRID) if background is None
        else kept_patches(pool.objects[i], rng, rng.uniform(*background))
        for i in scenes
    ]
    seqs = [packed(pool.scenes[i], rng, vocab, p.numel(), per_kind)
            for i, p in zip(scenes, patches)]
    length = max(len(seq.ids) for seq in seqs)
    n_queries = max(len(seq.lookups) for seq in seqs)
    input_ids = torch.full((batch, length), vocab["<pad>"])
    mask = torch.zeros((batch, length), dtype=torch.long)
    pos = torch.zeros((batch, length), dtype=torch.long)
    queries = torch.zeros((batch, n_queries), dtype=torch.long)
    lookup = torch.zeros((batch, n_queries, length), dtype=torch.bool)
    rows: list[int] = []
    cols: list[int] = []
    for b, (seq, i, p) in enumerate(zip(seqs, scenes, patches)):
        input_ids[b, : len(seq.ids)] = torch.tensor(seq.ids)
        mask[b, : len(seq.ids)] = 1
        pos[b, : len(seq.ids)] = positions(len(seq.ids), p)
        rows += [b] * len(seq.targets)
        cols += seq.targets
        owners = pool.owners[i][p]
        for q, (at, named) in enumerate(seq.lookups):
            queries[b, q] = at
            named_t = torch.tensor(named, dtype=torch.long)
            lookup[b, q, 3 : 3 + p.numel()] = torch.isin(owners, named_t)
    return LanguageBatch(input_ids, mask, pos, scenes, patches, torch.tensor(rows),
                         torch.tensor(cols), queries, lookup)


def language_loss(
    model: LlavaForConditionalGeneration,
    pool: FeaturePool,
    batch: LanguageBatch,
    lookup_heads: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the batch's target tokens (plus, with ``lookup_heads`` > 0, the
    look-up loss of the first ``lookup_heads`` heads of the first decoder layer: minus the log
    of the attention mass each subject word puts on the objects it names) and (T,) bool: which
    targets the model predicts right (argmax)."""
    kept = torch.cat([pool.features[i][p] for i, p in zip(batch.scenes, batch.patches)])
    feats = model.model.multi_modal_projector(kept.float())
    embeds = model.get_input_embeddings()(batch.input_ids)
    is_image = (batch.input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, feats.to(embeds.dtype))
    inputs = {"inputs_embeds": embeds, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids}
    if lookup_heads > 0:
        probe = TextAttentionProbe(model.model.language_model.layers[0].self_attn)
        handle = probe.install()
        try:
            logits = model(**inputs).logits
            attention = probe.differentiable_rows(batch.queries)[:, :lookup_heads]
        finally:
            handle.remove()
            probe.clear()
    else:
        logits = model(**inputs).logits
    picked = logits[batch.target_rows, batch.target_cols - 1]
    target = batch.input_ids[batch.target_rows, batch.target_cols]
    loss = nn.functional.cross_entropy(picked, target)
    if lookup_heads > 0:
        loss = loss + lookup_loss(attention, batch.lookup)
    return loss, picked.argmax(-1) == target


def lookup_loss(attention: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Mean over heads and the look-ups that name something of minus the log of the attention
    mass on the named tokens; ``attention`` (B, H, Q, L) probabilities, ``lookup`` (B, Q, L)
    bool."""
    named = lookup.any(-1)
    if not named.any():
        return attention.sum() * 0.0
    mass = (attention * lookup[:, None].to(attention.dtype)).sum(-1)
    return -torch.log(mass.clamp_min(1e-6)).transpose(0, 1)[:, named].mean()


def answer_accuracy(correct: Sequence[bool] | torch.Tensor) -> float:
    """Share of right answer words among a batch's targets (every reply is subject, answer,
    ``</s>``: the answers are targets 1, 4, 7, ...)."""
    correct = torch.as_tensor(correct)
    return float(correct[1::3].float().mean())
