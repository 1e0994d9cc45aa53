"""Train the toy LLaVA from scratch on 2 CPU cores: ``python -m vlprune.eval.toy.train``.

Two stages, as CLIP-based VLMs are built:

1. **Vision pretraining** (:mod:`~vlprune.eval.toy.vision_stage`): the ViT learns a CLS
   multi-label objective ("which colour / shape pairs are in the image", so CLS attention
   concentrates on objects, as in CLIP; measured by
   :func:`~vlprune.eval.toy.diagnostics.cls_attention_on_objects`) and dense patch objectives
   on LLaVA's feature layer (each patch's object pair, and its side of the image).
2. **Projector + language model** (:mod:`~vlprune.eval.toy.language_stage`) on the QA data with
   the ViT frozen: its features are computed once for a pool of training scenes; most steps
   feed the LLM the object patches plus a random share of the background, the last steps full
   576-token images.

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
from transformers import LlavaForConditionalGeneration

from vlprune.eval.toy import data
from vlprune.eval.toy.diagnostics import cls_attention_on_objects, evaluate
from vlprune.eval.toy.drawing import render
from vlprune.eval.toy.language_stage import (
    FeaturePool,
    answer_accuracy,
    build_pool,
    language_batch,
    language_loss,
)
from vlprune.eval.toy.model import (
    CHECKPOINT_DIR,
    load_toy_model,
    toy_model,
    toy_processor,
)
from vlprune.eval.toy.vision_stage import (
    VisionHeads,
    encode,
    pixels,
    training_scenes,
    vision_loss,
)

__all__ = [
    "TrainConfig",
    "export",
    "main",
    "train",
]


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train` (every field is a ``--flag`` of the script).

    Stage 1: ``vision_window_steps`` on 168 px windows then ``vision_full_steps`` on full
    images. Stage 2: a pool of ``pool_scenes`` scenes; ``lm_steps`` on object patches plus a
    background share drawn from [``background_min``, ``background_max``], the share of small
    scenes falling from 1 to ``small_share_final`` between ``small_until`` and
    ``small_until + small_decay`` steps; then ``lm_full_steps`` on full images. The first
    ``lookup_heads`` heads of the LLM's first layer are taught to look up what each reply's
    subject word names (:func:`~vlprune.eval.toy.language_stage.lookup_loss`; 0: off).
    """

    seed: int = 0
    threads: int = 2
    vision_window_steps: int = 2000
    vision_full_steps: int = 900
    vision_batch: int = 32
    vision_full_batch: int = 8
    vision_lr: float = 2e-3
    side_weight: float = 0.3
    shape_weight: float = 1.0
    pool_scenes: int = 4000
    lm_steps: int = 2500
    lm_full_steps: int = 150
    lm_batch: int = 16
    lm_full_batch: int = 8
    lm_lr: float = 2e-3
    questions_per_kind: int = 2
    lookup_heads: int = 1
    background_min: float = 0.02
    background_max: float = 0.15
    small_until: int = 500
    small_decay: int = 1000
    small_share_final: float = 0.3
    weight_decay: float = 0.05
    warmup: int = 50
    eval_every: int = 500
    eval_samples: int = 160
    checkpoint_every: int = 50
    test_samples: int = 1000
    fixed_sample: int = 64


# ----------------------------------------------------------------------------- steps


def _set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup: int) -> None:
    """Linear warm-up then cosine decay of every group's ``peak`` learning rate."""
    if step < warmup:
        factor = (step + 1) / warmup
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in opt.param_groups:
        group["lr"] = group["peak"] * factor


def _vision_step(run: _Run, opt: torch.optim.Optimizer, step: int) -> float:
    cfg, model = run.cfg, run.model
    full = step >= cfg.vision_window_steps
    _set_lr(opt, step, cfg.vision_window_steps + cfg.vision_full_steps, cfg.warmup)
    size = cfg.vision_full_batch if full else cfg.vision_batch
    scenes, row, col = training_scenes(cfg.seed, 1, step, size, full)
    vit = model.model.vision_tower
    states = encode(vit, pixels([render(s) for s in scenes], run.processor), row, col)
    loss = vision_loss(model, run.heads, states, scenes, cfg.side_weight, cfg.shape_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def small_share(cfg: TrainConfig, step: int) -> float:
    """Share of 1–3-object scenes in stage-2 step ``step``: 1 until ``small_until``, then
    falling linearly to ``small_share_final`` over ``small_decay`` steps; 0 on full images."""
    if step >= cfg.lm_steps:
        return 0.0
    fall = (step - cfg.small_until) / max(cfg.small_decay, 1)
    return max(cfg.small_share_final, min(1.0, 1.0 - fall * (1.0 - cfg.small_share_final)))


def _language_step(run: _Run, opt: torch.optim.Optimizer, step: int) -> float:
    cfg, model = run.cfg, run.model
    full = step >= cfg.lm_steps
    _set_lr(opt, step, cfg.lm_steps + cfg.lm_full_steps, cfg.warmup)
    batch = language_batch(
        run.pool, run.processor.tokenizer.get_vocab(), data.generator("train", cfg.seed, 5, step),
        cfg.lm_full_batch if full else cfg.lm_batch, small_share(cfg, step),
        None if full else (cfg.background_min, cfg.background_max), cfg.questions_per_kind,
    )
    loss, correct = language_loss(model, run.pool, batch, cfg.lookup_heads)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    run.answers.append(answer_accuracy(correct))
    return loss.item()


# ----------------------------------------------------------------------------- driver


class _Run:
    """Model, heads, optimizer state and log of a run, saved to / restored from
    ``out/state.pt``; the stage-2 feature pool is rebuilt on resume (deterministic)."""

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
        self.pool: FeaturePool | None = None
        self.answers: list[float] = []
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
        """Run ``step_fn(self, opt, step)`` up to ``total`` steps with logging (mean loss, and
        the share of right answer words where the step reports them), evaluation and
        checkpoints."""
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
                answers = {"answers": float(np.mean(self.answers))} if self.answers else {}
                self.record(loss=float(np.mean(losses)), **answers)
                losses, self.answers = [], []
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
        model.requires_grad_(False)
        start = time.perf_counter()
        run.pool = build_pool(model.eval(), run.processor, cfg.pool_scenes, cfg.seed)
        run.elapsed += time.perf_counter() - start
        language = [*model.model.multi_modal_projector.parameters(),
                    *model.model.language_model.parameters(), *model.lm_head.parameters()]
        for p in language:
            p.requires_grad_(True)
        opt = torch.optim.AdamW([{"params": language, "peak": cfg.lm_lr}],
                                weight_decay=cfg.weight_decay)

        def step_fn(run: _Run, opt: torch.optim.Optimizer, step: int) -> float:
            model.train()
            return _language_step(run, opt, step)

        run.loop(opt, cfg.lm_steps + cfg.lm_full_steps, step_fn,
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
