"""Train the toy LLaVA from scratch on 2 CPU cores: ``python -m vlprune.eval.toy.train``.

Two stages, as CLIP-based VLMs are built:

1. **Vision pretraining** (CLS objective). The ViT and a linear head on its pooled CLS state
   learn multi-label "which (colour, shape) pairs are in the image" (binary cross-entropy), so
   the CLS token must gather object patches: its attention at the last layers concentrates on
   objects, as in CLIP. For speed most steps see a 168×168 scene (1–3 objects) embedded at a
   random window of the 24×24 position table, i.e. 144 of the 576 patch tokens (FLIP-style
   token dropping: every position embedding is trained at its own place, no interpolation);
   the last steps see full 336×336 scenes with all 576 tokens.
2. **Projector + language model** on the QA data, ViT frozen (its penultimate-layer features,
   the ones LLaVA feeds the LLM, are computed once per training scene and cached). One sequence
   packs one question of each kind about a scene (``<s> user : <image> q1 assistant : a1 </s>
   user : q2 ...``); the loss is on answer words and ``</s>``. Questions are redrawn every epoch.

Everything is seeded (``--seed``); the run is resumable: ``state.pt`` in ``--out`` is written
every ``--checkpoint-every`` steps and at the end of each stage, and a rerun continues from it.
The finished model is saved with ``save_pretrained`` (float16 on disk) to ``--out/checkpoint``
together with the processor, and ``accuracy.json`` records its held-out accuracy; ``--ship``
writes them into the package (:data:`~vlprune.eval.toy.model.CHECKPOINT_DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from vlprune.adapters import get_adapter
from vlprune.eval.toy import data
from vlprune.eval.toy.benchmark import accuracy, predict
from vlprune.eval.toy.model import CHECKPOINT_DIR, load_toy_model, toy_model, toy_processor

__all__ = ["TrainConfig", "cls_attention_on_objects", "evaluate", "main", "pixels", "train"]

WINDOW_CANVAS = 168
CLS_LAYERS = (-2, -1)


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train` (every field is a ``--flag`` of the script)."""

    seed: int = 0
    threads: int = 2
    vision_window_steps: int = 1200
    vision_full_steps: int = 150
    vision_batch: int = 32
    vision_full_batch: int = 8
    vision_lr: float = 2e-3
    lm_scenes: int = 3000
    lm_steps: int = 1500
    lm_batch: int = 16
    lm_lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 50
    eval_every: int = 250
    eval_samples: int = 160
    checkpoint_every: int = 50
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


def _window_cls(vit: nn.Module, pixel_values: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Pooled CLS state (B, D) of ``vit`` on an image placed at patch (``row``, ``col``) of the
    full grid: patch embeddings get the position embeddings of that window."""
    emb = vit.embeddings
    side = emb.image_size // emb.patch_size
    n = pixel_values.shape[-1] // emb.patch_size
    patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    grid = torch.arange(side * side).view(side, side)[row : row + n, col : col + n].reshape(-1)
    pos = emb.position_embedding.weight
    cls = (emb.class_embedding + pos[0]).expand(len(pixel_values), 1, -1)
    hidden = torch.cat([cls, patches + pos[grid + 1]], dim=1)
    hidden = vit.encoder(inputs_embeds=vit.pre_layrnorm(hidden)).last_hidden_state
    return vit.post_layernorm(hidden[:, 0])


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- stage 1


def _vision_batch(cfg: TrainConfig, step: int, full: bool, processor: Any) -> tuple:
    canvas = data.IMAGE_SIZE if full else WINDOW_CANVAS
    n_objects = (data.MIN_OBJECTS, data.MAX_OBJECTS) if full else (1, 3)
    size = cfg.vision_full_batch if full else cfg.vision_batch
    scenes = [
        data.make_scene(data.generator("train", cfg.seed, 1, int(full), step, i),
                        canvas=canvas, n_objects=n_objects)
        for i in range(size)
    ]
    labels = torch.from_numpy(np.stack([data.scene_labels(s) for s in scenes]))
    window = data.generator("train", cfg.seed, 2, step).integers(0, 24 - canvas // 14 + 1, 2)
    return pixels([data.render(s) for s in scenes], processor), labels, window


def _vision_step(model, head, opt, cfg, step, processor) -> float:
    full = step >= cfg.vision_window_steps
    total = cfg.vision_window_steps + cfg.vision_full_steps
    for group in opt.param_groups:
        group["lr"] = _lr(step, total, cfg.vision_lr, cfg.warmup)
    pix, labels, (row, col) = _vision_batch(cfg, step, full, processor)
    vit = model.model.vision_tower
    pooled = vit(pix).pooler_output if full else _window_cls(vit, pix, int(row), int(col))
    loss = nn.functional.binary_cross_entropy_with_logits(head(pooled), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


# ----------------------------------------------------------------------------- stage 2


@torch.no_grad()
def _vision_features(model, cfg: TrainConfig, processor: Any) -> torch.Tensor:
    """(lm_scenes, 576, D) float16 penultimate-layer ViT features (CLS dropped) of the
    stage-2 training scenes."""
    vit = model.model.vision_tower
    layer = model.config.vision_feature_layer
    chunks = []
    for start in range(0, cfg.lm_scenes, 32):
        scenes = [_lm_scene(cfg, i) for i in range(start, min(start + 32, cfg.lm_scenes))]
        out = vit(pixels([data.render(s) for s in scenes], processor), output_hidden_states=True)
        chunks.append(out.hidden_states[layer][:, 1:].half())
    return torch.cat(chunks)


def _lm_scene(cfg: TrainConfig, index: int) -> data.Scene:
    return data.make_scene(data.generator("train", cfg.seed, 3, index))


def _packed(
    cfg: TrainConfig, index: int, epoch: int, tokenizer: Any
) -> tuple[list[int], list[int]]:
    """Token ids of the packed QA sequence of scene ``index`` at ``epoch`` and the positions
    of its target tokens (answer words and ``</s>``)."""
    rng = data.generator("train", cfg.seed, 4, epoch, index)
    scene = _lm_scene(cfg, index)
    turns = [data.ask(scene, kind, rng) for kind in rng.permutation(data.KINDS)]
    vocab = tokenizer.get_vocab()
    image = [vocab["<image>"]] * (data.IMAGE_SIZE // 14) ** 2
    ids = [vocab["<s>"], vocab["user"], vocab[":"], *image]
    targets = []
    for qa in turns:
        if qa is None:
            continue
        question, answer = qa
        if len(ids) > 3 + len(image):
            ids += [vocab["user"], vocab[":"]]
        ids += [vocab[w] for w in question.split()] + [vocab["assistant"], vocab[":"]]
        targets += [len(ids), len(ids) + 1]
        ids += [vocab[answer], vocab["</s>"]]
    return ids, targets


def _lm_step(model, opt, cfg, step, feats, tokenizer) -> float:
    for group in opt.param_groups:
        group["lr"] = _lr(step, cfg.lm_steps, cfg.lm_lr, cfg.warmup)
    first = step * cfg.lm_batch
    index = [(first + i) % cfg.lm_scenes for i in range(cfg.lm_batch)]
    epoch = first // cfg.lm_scenes
    seqs = [_packed(cfg, i, epoch, tokenizer) for i in index]
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    rows, cols = [], []
    for b, (ids, targets) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        rows += [b] * len(targets)
        cols += targets
    embeds = model.get_input_embeddings()(input_ids)
    image = model.model.multi_modal_projector(feats[index].float())
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, image.to(embeds.dtype))
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    loss = nn.functional.cross_entropy(logits[rows_t, cols_t - 1], input_ids[rows_t, cols_t])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: LlavaForConditionalGeneration, split: str, n: int) -> dict[str, float]:
    """Accuracy on the first ``n`` samples of ``split``: overall and per question kind."""
    model.eval()
    samples = data.samples(split, n)
    answers = predict(model, toy_processor(), samples)
    result = {"all": accuracy(answers, samples)}
    for kind in data.KINDS:
        pairs = [(a, s) for a, s in zip(answers, samples) if s.kind == kind]
        result[kind] = accuracy([a for a, _ in pairs], [s for _, s in pairs])
    return result


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
            side = data.IMAGE_SIZE // 14
            on = data.shape_mask(s.scene).reshape(side, 14, side, 14).any(axis=(1, 3)).reshape(-1)
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
    """Model, optimizer state and log of a run, saved to / restored from ``out/state.pt``."""

    def __init__(self, cfg: TrainConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.model = toy_model(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.head = nn.Linear(self.model.config.vision_config.hidden_size,
                                  len(data.COLORS) * len(data.SHAPES))
        self.stage, self.step, self.elapsed = "vision", 0, 0.0
        self.log: list[dict[str, Any]] = []
        self.opt_state: dict[str, Any] | None = None
        state_file = out / "state.pt"
        if state_file.is_file():
            state = torch.load(state_file, weights_only=False)
            if state["config"] != asdict(cfg):
                raise ValueError(f"{state_file} was written with another config; use a new --out")
            self.model.load_state_dict(state["model"])
            self.head.load_state_dict(state["head"])
            self.stage, self.step, self.elapsed = state["stage"], state["step"], state["elapsed"]
            self.log, self.opt_state = state["log"], state["optimizer"]
            print(f"resuming {self.stage} at step {self.step} ({self.elapsed / 60:.1f} min)")

    def save(self, opt: torch.optim.Optimizer | None) -> None:
        state = {
            "config": asdict(self.cfg), "model": self.model.state_dict(),
            "head": self.head.state_dict(), "stage": self.stage, "step": self.step,
            "elapsed": self.elapsed, "log": self.log,
            "optimizer": None if opt is None else opt.state_dict(),
        }
        torch.save(state, self.out / "state.pt.tmp")
        (self.out / "state.pt.tmp").replace(self.out / "state.pt")

    def record(self, **entry: Any) -> None:
        entry = {"stage": self.stage, "step": self.step, "minutes": self.elapsed / 60, **entry}
        self.log.append(entry)
        print(json.dumps(entry), flush=True)


def _loop(run: _Run, opt: torch.optim.Optimizer, total: int, step_fn, evaluate_fn=None) -> None:
    cfg = run.cfg
    if run.opt_state is not None:
        opt.load_state_dict(run.opt_state)
        run.opt_state = None
    losses: list[float] = []
    while run.step < total:
        start = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + run.step)
        losses.append(step_fn(run.step))
        run.step += 1
        run.elapsed += time.perf_counter() - start
        if run.step % cfg.checkpoint_every == 0 or run.step == total:
            run.record(loss=float(np.mean(losses)))
            losses = []
            if evaluate_fn is not None and (run.step % cfg.eval_every == 0 or run.step == total):
                run.record(val=evaluate_fn())
            run.save(opt)


def train(cfg: TrainConfig, out: Path) -> LlavaForConditionalGeneration:
    """Run (or resume) both stages; returns the trained float32 model."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out)
    model, processor = run.model, toy_processor()
    if run.stage == "vision":
        model.train()
        vit = model.model.vision_tower
        params = [*vit.parameters(), *run.head.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
        total = cfg.vision_window_steps + cfg.vision_full_steps
        _loop(run, opt, total, lambda s: _vision_step(model, run.head, opt, cfg, s, processor))
        run.record(cls_attention=cls_attention_on_objects(model.eval()))
        run.stage, run.step, run.opt_state = "language", 0, None
        run.save(None)
    if run.stage == "language":
        start = time.perf_counter()
        feats = _vision_features(model.eval(), cfg, processor)
        run.elapsed += time.perf_counter() - start
        model.requires_grad_(False)
        trainable = [*model.model.multi_modal_projector.parameters(),
                     *model.model.language_model.parameters(), *model.lm_head.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(trainable, lr=cfg.lm_lr, weight_decay=cfg.weight_decay)
        tokenizer = processor.tokenizer

        def step_fn(step: int) -> float:
            model.train()
            return _lm_step(model, opt, cfg, step, feats, tokenizer)

        _loop(run, opt, cfg.lm_steps, step_fn, lambda: evaluate(model, "val", cfg.eval_samples))
        run.stage = "done"
        run.save(None)
    model.requires_grad_(False)
    return model.eval()


def export(model: LlavaForConditionalGeneration, run_log: list[dict[str, Any]], cfg: TrainConfig,
           out: Path) -> dict[str, Any]:
    """Save model (float16) + processor to ``out``, reload it and record its held-out accuracy
    in ``out/accuracy.json``."""
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
    for f in fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    model = train(cfg, args.out)
    log = torch.load(args.out / "state.pt", weights_only=False)["log"]
    record = export(model, log, cfg, args.out / "checkpoint")
    print(json.dumps({k: record[k] for k in ("test", "cls_attention_on_objects", "train_minutes")}))
    if args.ship:
        shutil.copytree(args.out / "checkpoint", CHECKPOINT_DIR, dirs_exist_ok=True)
        print(f"shipped to {CHECKPOINT_DIR}")


if __name__ == "__main__":
    main()
