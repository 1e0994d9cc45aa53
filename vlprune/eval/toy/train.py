"""Train the toy LLaVA from scratch on 2 CPU cores: ``python -m vlprune.eval.toy.train``.

Two stages, as CLIP-based VLMs are built:

1. **Vision pretraining** (CLS objective). The ViT and a linear head on its pooled CLS state
   learn multi-label "which (colour, shape) pairs are in the image" (binary cross-entropy), so
   the CLS token must gather the object patches: its attention at the last layers concentrates
   on objects, as in CLIP (:func:`cls_attention_on_objects` measures it).
2. **Projector + language model** on the QA data, ViT frozen (LLaVA's features: penultimate
   layer, CLS dropped). One sequence asks one question of each kind about a scene
   (``<s> user : <image> q1 assistant : subject1 answer1 </s> user : q2 ...``); the loss is on
   the replies (subject word, answer word, ``</s>``). Presence questions are asked
   ``presence_questions`` times per scene (their 24 pair words are rarer than the other
   subjects); left / right questions join after ``position_from`` steps, once the model looks
   objects up by their words.

Speed (FLIP-style token dropping): most steps of both stages see a 168×168 scene (1–3 objects)
placed at a random window of the 24×24 patch grid, i.e. 144 of the 576 tokens, each with the
position embedding and the LLM RoPE position it has in a full image (:func:`encode`,
:func:`_positions`), so nothing is interpolated; the last steps of each stage see full 336×336
scenes (3–6 objects, all 576 tokens), the geometry the model is evaluated on.

Everything is seeded (``--seed``); the run is resumable: ``state.pt`` in ``--out`` is written
every ``--checkpoint-every`` steps and at the end of each stage, and a rerun continues from it.
The finished model is saved with ``save_pretrained`` (float16 on disk) to ``--out/checkpoint``
together with the processor, and ``accuracy.json`` records its held-out accuracy; ``--ship``
copies them into the package (:data:`~vlprune.eval.toy.model.CHECKPOINT_DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from vlprune.adapters import get_adapter
from vlprune.eval.toy import data
from vlprune.eval.toy.benchmark import accuracy, accuracy_by_kind, predict
from vlprune.eval.toy.data import IMAGE_SIZE
from vlprune.eval.toy.model import (
    CHECKPOINT_DIR,
    PATCH_SIZE,
    load_toy_model,
    toy_model,
    toy_processor,
)

__all__ = [
    "TrainConfig",
    "cls_attention_on_objects",
    "encode",
    "evaluate",
    "export",
    "main",
    "pixels",
    "train",
]

GRID = IMAGE_SIZE // PATCH_SIZE
WINDOW = 12
WINDOW_OBJECTS = (1, 3)
CLS_LAYERS = (-2, -1)


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train` (every field is a ``--flag`` of the script)."""

    seed: int = 0
    threads: int = 2
    vision_window_steps: int = 3000
    vision_full_steps: int = 500
    vision_batch: int = 32
    vision_full_batch: int = 8
    vision_lr: float = 2e-3
    lm_window_steps: int = 1200
    lm_full_steps: int = 400
    lm_batch: int = 16
    lm_lr: float = 2e-3
    lm_vision_lr: float = 0.0
    position_from: int = 600
    presence_questions: int = 1
    questions_per_kind: int = 1
    weight_decay: float = 0.05
    warmup: int = 50
    eval_every: int = 300
    eval_samples: int = 160
    checkpoint_every: int = 25
    test_samples: int = 1000
    fixed_sample: int = 64


# ----------------------------------------------------------------------------- inputs


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


def _set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup: int) -> None:
    """Linear warm-up then cosine decay of every group's ``peak`` learning rate."""
    if step < warmup:
        factor = (step + 1) / warmup
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in opt.param_groups:
        group["lr"] = group["peak"] * factor


def _scenes(cfg: TrainConfig, stage: int, step: int, size: int, full: bool) -> tuple:
    """``size`` training scenes of ``stage`` at ``step`` (full 336 px, or one window of 168 px
    with 1–3 objects) and the window's patch offset (row, col)."""
    row, col = (0, 0) if full else data.generator("train", cfg.seed, stage, step).integers(
        0, GRID - WINDOW + 1, 2
    )
    canvas = IMAGE_SIZE if full else WINDOW * PATCH_SIZE
    n_objects = (data.MIN_OBJECTS, data.MAX_OBJECTS) if full else WINDOW_OBJECTS
    scenes = [
        data.make_scene(data.generator("train", cfg.seed, stage, step, i),
                        canvas=canvas, n_objects=n_objects, x0=int(col) * PATCH_SIZE)
        for i in range(size)
    ]
    return scenes, int(row), int(col)


# ----------------------------------------------------------------------------- stage 1


class VisionHeads(nn.Module):
    """Stage-1 heads: ``cls`` on the pooled CLS state → 24 (colour, shape) pairs + 4 shapes +
    6 colours present (multi-label); ``patch`` on each patch token of LLaVA's feature layer →
    its object's (colour, shape) pair or background (25 classes)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        pairs = len(data.COLORS) * len(data.SHAPES)
        self.cls = nn.Linear(hidden, pairs + len(data.SHAPES) + len(data.COLORS))
        self.patch = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, pairs + 1))


def _vision_targets(scenes: list[data.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 34) float CLS targets and (B, n²) long patch targets (pair index, 24 = background)."""
    pairs = np.stack([data.scene_labels(s) for s in scenes])
    grid = pairs.reshape(len(scenes), len(data.COLORS), len(data.SHAPES))
    cls = np.concatenate([pairs, grid.max(axis=1), grid.max(axis=2)], axis=1)
    patches = []
    for scene in scenes:
        owner = data.patch_objects(scene, PATCH_SIZE)
        index = np.array([*(data.pair_index(o) for o in scene.objects), len(data.COLORS) * len(
            data.SHAPES)])
        patches.append(index[owner])
    return torch.from_numpy(cls), torch.from_numpy(np.stack(patches))


def _vision_loss(run: _Run, states: list[torch.Tensor], scenes: list[data.Scene]) -> torch.Tensor:
    """CLS multi-label loss plus the dense patch loss on the feature layer."""
    cls_target, patch_target = _vision_targets(scenes)
    vit = run.model.model.vision_tower
    cls_logits = run.heads.cls(vit.post_layernorm(states[-1][:, 0]))
    feature = states[run.model.config.vision_feature_layer][:, 1:]
    return nn.functional.binary_cross_entropy_with_logits(cls_logits, cls_target) + (
        nn.functional.cross_entropy(run.heads.patch(feature).flatten(0, 1), patch_target.flatten())
    )


def _vision_step(run: _Run, opt: torch.optim.Optimizer, step: int) -> float:
    cfg, model = run.cfg, run.model
    full = step >= cfg.vision_window_steps
    _set_lr(opt, step, cfg.vision_window_steps + cfg.vision_full_steps, cfg.warmup)
    size = cfg.vision_full_batch if full else cfg.vision_batch
    scenes, row, col = _scenes(cfg, 1, step, size, full)
    vit = model.model.vision_tower
    states = encode(vit, pixels([data.render(s) for s in scenes], run.processor), row, col)
    loss = _vision_loss(run, states, scenes)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- stage 2


def _packed(
    scene: data.Scene, rng: np.random.Generator, vocab: dict[str, int], n_image: int,
    per_kind: int = 1, kinds: tuple[str, ...] = data.KINDS,
) -> tuple[list[int], list[int]]:
    """Token ids of one sequence asking ``per_kind`` questions of each of ``kinds`` about
    ``scene`` (in random order, kinds without a question skipped) and the indices of its target
    tokens (the replies: subject word, answer word, ``</s>``)."""
    ids = [vocab["<s>"], vocab["user"], vocab[":"], *[vocab["<image>"]] * n_image]
    targets: list[int] = []
    for kind in rng.permutation(np.repeat(kinds, per_kind)):
        qa = data.ask(scene, str(kind), rng)
        if qa is None:
            continue
        question, subject, answer = qa
        if targets:
            ids += [vocab["user"], vocab[":"]]
        ids += [vocab[w] for w in question.split()] + [vocab["assistant"], vocab[":"]]
        targets += [len(ids), len(ids) + 1, len(ids) + 2]
        ids += [vocab[subject], vocab[answer], vocab["</s>"]]
    return ids, targets


def _positions(length: int, image: torch.Tensor) -> torch.Tensor:
    """(length,) RoPE positions of a sequence ``<s> user : [image tokens] text``: the image
    tokens keep their places ``image`` (raster indices) in the full 576-token layout, the text
    after them starts at 3 + 576, as in a full prompt (and as pruned prompts keep them)."""
    n = image.numel()
    text = torch.arange(3 + GRID * GRID, 3 + GRID * GRID + length - 3 - n)
    return torch.cat([torch.arange(3), 3 + image, text])


def _language_step(run: _Run, opt: torch.optim.Optimizer, step: int) -> float:
    cfg, model = run.cfg, run.model
    full = step >= cfg.lm_window_steps
    _set_lr(opt, step, cfg.lm_window_steps + cfg.lm_full_steps, cfg.warmup)
    scenes, row, col = _scenes(cfg, 2, step, cfg.lm_batch, full)
    image = window_index(row, col, GRID if full else WINDOW)
    vocab = run.processor.tokenizer.get_vocab()
    kinds = tuple(
        k for kind in data.KINDS if kind != "position" or step >= cfg.position_from
        for k in [kind] * (cfg.presence_questions if kind == "presence" else 1)
    )
    seqs = [
        _packed(s, data.generator("train", cfg.seed, 3, step, i), vocab, image.numel(),
                cfg.questions_per_kind, kinds)
        for i, s in enumerate(scenes)
    ]
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), vocab["<pad>"])
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    positions = torch.zeros((len(seqs), length), dtype=torch.long)
    rows, cols = [], []
    for b, (ids, targets) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        positions[b, : len(ids)] = _positions(len(ids), image)
        rows += [b] * len(targets)
        cols += targets
    vit = model.model.vision_tower
    with torch.set_grad_enabled(cfg.lm_vision_lr > 0):
        states = encode(vit, pixels([data.render(s) for s in scenes], run.processor), row, col)
    feats = model.model.multi_modal_projector(states[model.config.vision_feature_layer][:, 1:])
    embeds = model.get_input_embeddings()(input_ids)
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, feats.to(embeds.dtype))
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    loss = nn.functional.cross_entropy(logits[rows_t, cols_t - 1], input_ids[rows_t, cols_t])
    if cfg.lm_vision_lr > 0:  # keep the stage-1 objectives while the ViT is tuned
        loss = loss + _vision_loss(run, states, scenes)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: LlavaForConditionalGeneration, split: str, n: int) -> dict[str, float]:
    """Accuracy on the first ``n`` samples of ``split``: overall and per question kind."""
    model.eval()
    samples = data.samples(split, n)
    answers = predict(model, toy_processor(), samples)
    return {"all": accuracy(answers, samples), **accuracy_by_kind(answers, samples)}


@torch.no_grad()
def cls_attention_on_objects(
    model: LlavaForConditionalGeneration, n: int = 64, layers: tuple[int, ...] = CLS_LAYERS
) -> dict[str, float]:
    """Share of the CLS token's attention (head mean, over the 576 patch keys) that falls on
    patches touching an object, at each of ``layers``, over ``n`` test images; ``"patches"`` is
    the share of such patches (what uniform attention would give)."""
    adapter = get_adapter(model)
    depth = len(adapter.vision_layers)
    probes = {layer: adapter.vision_probe(layer % depth) for layer in layers}
    handles = [p.install() for p in probes.values()]
    processor = toy_processor()
    shares: dict[int, list[float]] = {layer: [] for layer in layers}
    patch_share = []
    try:
        for s in data.samples("test", n):
            mask = data.shape_mask(s.scene).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE)
            on = mask.any(axis=(1, 3)).reshape(-1)
            on_t = torch.from_numpy(on)
            model.model.vision_tower(pixels([s.image], processor))
            for layer, probe in probes.items():
                row = probe.rows(torch.tensor([0]))[0].mean(0)[0, 1:]
                shares[layer].append(float(row[on_t].sum() / row.sum()))
            patch_share.append(float(on.mean()))
    finally:
        for h in handles:
            h.remove()
    out = {f"layer{layer}": float(np.mean(v)) for layer, v in shares.items()}
    return {**out, "patches": float(np.mean(patch_share))}


# ----------------------------------------------------------------------------- driver


class _Run:
    """Model, head, optimizer state and log of a run, saved to / restored from
    ``out/state.pt``."""

    def __init__(self, cfg: TrainConfig, out: Path, vision_from: Path | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.processor = toy_processor()
        self.model = toy_model(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.heads = VisionHeads(self.model.config.vision_config.hidden_size)
        self.stage, self.step, self.elapsed = "vision", 0, 0.0
        self.log: list[dict[str, Any]] = []
        self.opt_state: dict[str, Any] | None = None
        state_file = out / "state.pt"
        if state_file.is_file():
            state = torch.load(state_file, weights_only=False)
            if state["config"] != asdict(cfg):
                raise ValueError(f"{state_file} was written with another config; use a new --out")
            self._restore(state)
            print(f"resuming {self.stage} at step {self.step} ({self.elapsed / 60:.1f} min)")
        elif vision_from is not None:
            state = torch.load(vision_from, weights_only=False)
            if state["stage"] == "vision":
                raise ValueError(f"{vision_from} has not finished vision pretraining")
            prefix = "model.vision_tower."
            vision = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
            self.model.model.vision_tower.load_state_dict(vision)
            self.heads.load_state_dict(state["heads"])
            self.stage = "language"
            self.log = [e for e in state["log"] if e["stage"] == "vision"]
            self.elapsed = self.log[-1]["minutes"] * 60

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.stage, self.step, self.elapsed = state["stage"], state["step"], state["elapsed"]
        self.log, self.opt_state = state["log"], state["optimizer"]

    def save(self, opt: torch.optim.Optimizer | None) -> None:
        state = {
            "config": asdict(self.cfg), "model": self.model.state_dict(),
            "heads": self.heads.state_dict(), "stage": self.stage, "step": self.step,
            "elapsed": self.elapsed, "log": self.log,
            "optimizer": None if opt is None else opt.state_dict(),
        }
        torch.save(state, self.out / "state.pt.tmp")
        (self.out / "state.pt.tmp").replace(self.out / "state.pt")

    def record(self, **entry: Any) -> None:
        entry = {"stage": self.stage, "step": self.step, "minutes": self.elapsed / 60, **entry}
        self.log.append(entry)
        print(json.dumps(entry), flush=True)

    def loop(self, opt: torch.optim.Optimizer, total: int, step_fn: Callable, evaluate_fn:
             Callable[[], dict[str, float]] | None = None) -> None:
        """Run ``step_fn(self, opt, step)`` up to ``total`` steps with logging, evaluation
        and checkpoints."""
        cfg = self.cfg
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
            self.opt_state = None
        losses: list[float] = []
        while self.step < total:
            start = time.perf_counter()
            torch.manual_seed(cfg.seed * 100_003 + self.step)
            losses.append(step_fn(self, opt, self.step))
            self.step += 1
            self.elapsed += time.perf_counter() - start
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self.record(loss=float(np.mean(losses)))
                losses = []
                if evaluate_fn is not None and (self.step % cfg.eval_every == 0
                                                or self.step == total):
                    start = time.perf_counter()
                    self.record(val=evaluate_fn())
                    self.elapsed += time.perf_counter() - start
                self.save(opt)


def train(cfg: TrainConfig, out: Path, vision_from: Path | None = None
          ) -> tuple[LlavaForConditionalGeneration, list[dict[str, Any]]]:
    """Run (or resume) both stages; returns the trained float32 model (eval mode) and the
    training log. ``vision_from``: a ``state.pt`` whose finished vision stage is reused."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out, vision_from)
    model = run.model
    if run.stage == "vision":
        model.train()
        params = [*model.model.vision_tower.parameters(), *run.heads.parameters()]
        opt = torch.optim.AdamW([{"params": params, "peak": cfg.vision_lr}],
                                weight_decay=cfg.weight_decay)
        run.loop(opt, cfg.vision_window_steps + cfg.vision_full_steps, _vision_step)
        run.record(cls_attention=cls_attention_on_objects(model.eval()))
        run.stage, run.step, run.opt_state = "language", 0, None
        run.save(None)
    if run.stage == "language":
        language = [*model.model.multi_modal_projector.parameters(),
                    *model.model.language_model.parameters(), *model.lm_head.parameters()]
        vision = [*model.model.vision_tower.parameters(), *run.heads.parameters()]
        groups = [{"params": language, "peak": cfg.lm_lr}]
        if cfg.lm_vision_lr > 0:
            groups.append({"params": vision, "peak": cfg.lm_vision_lr})
        else:
            for p in vision:
                p.requires_grad_(False)
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

        def step_fn(run: _Run, opt: torch.optim.Optimizer, step: int) -> float:
            model.train()
            return _language_step(run, opt, step)

        run.loop(opt, cfg.lm_window_steps + cfg.lm_full_steps, step_fn,
                 lambda: evaluate(model, "val", cfg.eval_samples))
        run.stage = "done"
        run.save(None)
    model.requires_grad_(False)
    return model.eval(), run.log


def export(model: LlavaForConditionalGeneration, run_log: list[dict[str, Any]], cfg: TrainConfig,
           out: Path, vision_from: Path | None = None) -> dict[str, Any]:
    """Save model (float16) + processor to ``out``, reload it and record its held-out accuracy
    in ``out/accuracy.json`` (with ``vision_from``, the state its vision stage came from)."""
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    model.float()
    toy_processor().save_pretrained(out)
    shipped = load_toy_model(out)
    record = {
        "test": evaluate(shipped, "test", cfg.test_samples),
        "test_samples": cfg.test_samples,
        "fixed_sample": {"n": cfg.fixed_sample, **evaluate(shipped, "test", cfg.fixed_sample)},
        "cls_attention_on_objects": cls_attention_on_objects(shipped),
        "train_minutes": run_log[-1]["minutes"] if run_log else None,
        "config": asdict(cfg),
        "vision_stage": "trained in this run" if vision_from is None else f"from {vision_from}",
        "log": run_log,
    }
    (out / "accuracy.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m vlprune.eval.toy.train [--out DIR] [--ship] [--field value]``."""
    parser = argparse.ArgumentParser(prog="python -m vlprune.eval.toy.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("toy_run"), help="work directory")
    parser.add_argument("--ship", action="store_true",
                        help=f"also copy the checkpoint into the package ({CHECKPOINT_DIR})")
    parser.add_argument("--vision-from", type=Path, default=None,
                        help="state.pt of a run whose vision stage to reuse (skips stage 1)")
    for f in fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    model, log = train(cfg, args.out, args.vision_from)
    record = export(model, log, cfg, args.out / "checkpoint", args.vision_from)
    print(json.dumps({k: record[k] for k in ("test", "cls_attention_on_objects", "train_minutes")}))
    if args.ship:
        shutil.copytree(args.out / "checkpoint", CHECKPOINT_DIR, dirs_exist_ok=True)
        print(f"shipped to {CHECKPOINT_DIR}")


if __name__ == "__main__":
    main()
