"""lmms-eval on the shipped toy LLaVA, offline, end to end through the real ``vlprune eval`` CLI.

The checkpoint's chat template reproduces the prompt the toy model was trained on, and the toy
tasks (``vlprune_toy``: generation; ``vlprune_toy_mc``: multiple choice) are built from the toy
data generator's held-out questions. One ``vlprune eval --config`` process runs every setting
on the first ``N_DOCS`` questions (16 per kind) and the test pins: the unpruned model scores
≥ 85 % on both tasks; every attention- or coverage-based method at ``BUDGET`` of 576 tokens
stays within 5 points of it; ``random`` at 64 tokens falls far below; batch 4 answers exactly
like batch 1 (unpruned, a vision-side and a decoder-side method).

Measured (float32, this checkpoint): unpruned 98.4 % on both tasks; at 128 tokens the informed
methods 93.8–96.9 % (generation) and 95.3–96.9 % (multiple choice), the closest to the 5-point
line being ``hired`` on generation (93.8 %, 3 answers of 64 below); ``random`` at 64 tokens
65.6 % on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor

from vlprune.eval.toy import data
from vlprune.eval.toy.lmms_task import CHOICES, toy_docs
from vlprune.eval.toy.model import CHAT_TEMPLATE, CHECKPOINT_DIR, prompt

N_DOCS = 64
N_BATCH_1 = 16
"""Documents of the batch-1 runs (batch 4 must answer them exactly as batch 1 does)."""
BUDGET = 128
INFORMED = ("fastv", "flowcut", "globalcom2", "hiprune", "hired", "mmtok", "todre", "transprune")
TASKS = ("vlprune_toy", "vlprune_toy_mc")
METRIC = {"vlprune_toy": "exact_match,none", "vlprune_toy_mc": "acc,none"}
RUNS: dict[str, tuple[str, int | None, int]] = {
    "none": ("none", None, 4),
    "none_bs1": ("none", None, 1),
    **{name: (name, BUDGET, 4) for name in INFORMED},
    "hiprune_bs1": ("hiprune", BUDGET, 1),
    "fastv_bs1": ("fastv", BUDGET, 1),
    "random": ("random", 64, 4),
}
"""Run name → (method, budget, batch size)."""
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_chat_template_is_the_trained_prompt() -> None:
    """The shipped ``chat_template.jinja`` is ``CHAT_TEMPLATE`` and renders one user turn
    exactly as the training prompt, and a second turn as the trained multi-turn format."""
    assert (CHECKPOINT_DIR / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    for s in data.samples("test", 8):
        turn = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": s.question}]}]
        text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        assert text == prompt(s.question)
    chat = [*turn, {"role": "assistant", "content": "circle red"},
            {"role": "user", "content": "how many circles are there ?"}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == (f"{prompt(s.question)} circle red </s> user : how many circles are there ? "
                    "assistant :")


def test_toy_docs_are_the_held_out_questions() -> None:
    """Each document is the held-out sample of its index; its target is "subject answer" and
    its label points at that choice among all answers of its kind."""
    docs = toy_docs("test", 12)
    for doc in docs:
        s = data.sample("test", doc["index"])
        assert (doc["question"], doc["subject"], doc["answer"], doc["kind"]) == (
            s.question, s.subject, s.answer, s.kind)
        assert doc["choices"][doc["label"]] == doc["target"] == f"{s.subject} {s.answer}"
        assert len(doc["choices"]) == len(CHOICES[s.kind])


def test_auto_dtype_is_float32_on_cpu() -> None:
    """The toy checkpoint is float16 on disk; ``dtype=auto`` loads it in float32 on CPU (half
    precision there is ~4x slower and its sums depend on the batch)."""
    pytest.importorskip("lmms_eval")
    import torch

    from vlprune.eval.lmms import VLPrune

    lm = VLPrune(pretrained=str(CHECKPOINT_DIR), device="cpu")
    assert lm.model.dtype == torch.float32
    assert VLPrune(pretrained=str(CHECKPOINT_DIR), device="cpu",
                   dtype="float16").model.dtype == torch.float16


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ``vlprune eval --config`` process over every run of ``RUNS``; run → output folder."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (scripts/setup_dev.sh)")
    root = tmp_path_factory.mktemp("toy_lmms")
    entries, outputs = [], {}
    for name, (method, budget, batch) in RUNS.items():
        outputs[name] = root / name
        args = f"pretrained={CHECKPOINT_DIR},method={method},stats_path={outputs[name] / 'stats'}"
        if budget is not None:
            args += f",budget={budget}"
        entries.append({"model_args": args, "batch_size": batch, "output_path": str(outputs[name]),
                        "limit": N_DOCS if batch > 1 else N_BATCH_1})
    config = root / "runs.yaml"
    config.write_text(json.dumps(entries))  # JSON is YAML
    cmd = [sys.executable, "-m", "vlprune.cli", "eval", "--config", str(config), "--tasks",
           ",".join(TASKS), "--log_samples"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=3000,
                          env={**os.environ, **ENV, "HF_HOME": str(root / "hf")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return outputs


def _scores(out: Path) -> dict[str, float]:
    (path,) = out.rglob("*_results.json")
    results = json.loads(path.read_text())["results"]
    return {task: results[task][METRIC[task]] for task in TASKS}


def _samples(out: Path, task: str) -> dict[int, Any]:
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["doc_id"]: row["filtered_resps"] for row in rows}


@pytest.mark.slow
def test_accuracy_unpruned_informed_random(evaluated: dict[str, Path]) -> None:
    """Unpruned ≥ 85 % on both tasks; each informed method at ``BUDGET`` within 5 points of
    it; ``random`` at 64 tokens at least 15 points below it."""
    base = _scores(evaluated["none"])
    assert all(v >= 0.85 for v in base.values()), base
    for name in INFORMED:
        scores = _scores(evaluated[name])
        for task in TASKS:
            assert scores[task] >= base[task] - 0.05, (name, task, scores[task], base[task])
    random = _scores(evaluated["random"])
    for task in TASKS:
        assert random[task] <= base[task] - 0.15, (task, random[task], base[task])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["none", "hiprune", "fastv"])
def test_batch_4_equals_batch_1(evaluated: dict[str, Path], name: str) -> None:
    """On the batch-1 runs' documents, batches of 4 generate the same replies and give the
    same loglikelihoods (to float tolerance) as batch 1."""
    four, one = evaluated[name], evaluated[f"{name}_bs1"]
    replies = _samples(one, "vlprune_toy")
    assert len(replies) == N_BATCH_1
    assert {d: r for d, r in _samples(four, "vlprune_toy").items() if d in replies} == replies
    a, b = _samples(four, "vlprune_toy_mc"), _samples(one, "vlprune_toy_mc")
    assert len(b) == N_BATCH_1
    for doc_id, choices in b.items():
        for (loss_a, greedy_a), (loss_b, greedy_b) in zip(a[doc_id], choices):
            assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-4)
            assert greedy_a == greedy_b
