"""Accuracy of the toy LLaVA on the synthetic QA, unpruned and under every pruning method.

Scoring: every answer is one word of the vocabulary, so the model's answer is its greedy next
token after the prompt (``argmax`` over the whole vocabulary of the last prompt position's
logits, which is what ``generate(max_new_tokens=1)`` returns), and a sample is correct when that
token is the answer (exact match). One prefill per sample, no decoding.

:func:`run_benchmark` scores the unpruned model and every registered method at each budget on
the same held-out samples, with the visual tokens that reach the language model, the prefill
FLOPs (analytic, :mod:`vlprune.eval.profiler`, when it is importable) and the batch-1 prefill
time. A method that cannot run on the model is reported with its error instead of numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import vlprune
from vlprune.eval.toy.data import QASample, samples
from vlprune.eval.toy.model import load_toy_model, prompt, toy_processor

__all__ = [
    "BUDGETS",
    "BenchmarkRow",
    "accuracy",
    "accuracy_by_kind",
    "model_inputs",
    "predict",
    "prefill_flops",
    "run_benchmark",
]

BUDGETS: tuple[int, ...] = (64, 128, 192)
"""1/9, 1/4.5 and 1/3 of LLaVA-1.5's 576 visual tokens, as in the papers' tables."""


def model_inputs(processor: LlavaProcessor, batch: Sequence[QASample]) -> dict[str, torch.Tensor]:
    """Left-padded prompts + pixels of ``batch``, with position ids that skip the padding (as
    ``generate`` builds them), so a sample's answer does not depend on its batch."""
    inputs = processor(
        text=[prompt(s.question, s.subject) for s in batch],
        images=[s.image for s in batch],
        padding=True,
        return_tensors="pt",
    )
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {**inputs, "position_ids": positions}


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[QASample],
    *,
    batch_size: int = 16,
) -> list[str]:
    """The model's one-word answer to each sample (greedy next token)."""
    words: list[str] = []
    for start in range(0, len(samples), batch_size):
        inputs = model_inputs(processor, samples[start : start + batch_size])
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words.extend(processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()))
    return words


def accuracy_by_kind(answers: Sequence[str], samples: Sequence[QASample]) -> dict[str, float]:
    """Exact-match accuracy per question kind present in ``samples``."""
    kinds = dict.fromkeys(s.kind for s in samples)
    return {
        kind: accuracy(*zip(*[(a, s) for a, s in zip(answers, samples) if s.kind == kind]))
        for kind in kinds
    }


def accuracy(answers: Sequence[str], samples: Sequence[QASample]) -> float:
    """Exact-match accuracy of ``answers`` against the samples' answers, in [0, 1]."""
    if len(answers) != len(samples):
        raise ValueError(f"{len(answers)} answers for {len(samples)} samples")
    return sum(a == s.answer for a, s in zip(answers, samples)) / max(len(samples), 1)


@dataclass
class BenchmarkRow:
    """One (method, budget) of :func:`run_benchmark`; ``method="none"`` is the unpruned model.

    ``accuracy`` in [0, 1] (mean over ``seeds`` for ``random``), ``per_kind`` the same per
    question kind; ``relative``: accuracy / the unpruned accuracy; ``tokens``: mean visual
    tokens into the language model (after the last decoder cut); ``flops``: prefill FLOPs of
    one sample (None without the profiler); ``prefill_ms``: median batch-1 prefill time;
    ``error``: why the method could not run.
    """

    method: str
    budget: int | None
    accuracy: float | None = None
    relative: float | None = None
    tokens: float | None = None
    flops: float | None = None
    prefill_ms: float | None = None
    per_seed: tuple[float, ...] = ()
    per_kind: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain-dict view (JSON-serialisable)."""
        return asdict(self)


def prefill_flops(
    model: LlavaForConditionalGeneration,
    layer_tokens: Sequence[int],
    vision_layer_tokens: Sequence[int] = (),
) -> float | None:
    """Exact analytic prefill FLOPs (vision encoder, projector, LLM, LM head) of one sample
    whose decoder layers see ``layer_tokens`` tokens each and whose vision layers see
    ``vision_layer_tokens`` (empty: nothing cut inside the encoder); None when
    :mod:`vlprune.eval.profiler` is not available."""
    try:
        from vlprune.eval.profiler.flops import RunTokens, arch_from_config, exact_flops
        from vlprune.eval.profiler.presets import image_geometry
    except ImportError:
        return None
    size = model.config.vision_config.image_size
    run = RunTokens(list(layer_tokens), [image_geometry(model.config, "llava", (size, size))],
                    [list(vision_layer_tokens)] if vision_layer_tokens else [])
    return exact_flops(arch_from_config(model.config, "llava"), run).prefill


@torch.no_grad()
def _timed_prefill(
    model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor], repeats: int
) -> float | None:
    """Median wall time (ms) of ``repeats`` forwards after one warm-up (None for 0 repeats:
    the warm-up alone, which fills the handle's stats)."""
    model(**inputs, logits_to_keep=1)
    if not repeats:
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _measure(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    data: Sequence[QASample],
    handle: vlprune.PatchHandle | None,
    batch_size: int,
    repeats: int,
) -> tuple[float, dict[str, float], float, float | None, float | None]:
    """(accuracy, accuracy per kind, mean visual tokens into the LLM, prefill FLOPs, prefill
    ms) of one setting."""
    answers, kept = [], []
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        answers += predict(model, processor, chunk, batch_size=batch_size)
        kept += (handle.stats.kept_tokens if handle is not None
                 else [model.config.image_seq_length] * len(chunk))
    one = model_inputs(processor, data[:1])
    ms = _timed_prefill(model, one, repeats)
    if handle is not None:  # stats of the timed batch-1 prefill
        stats = handle.stats
        layers = stats.layer_tokens[0]
        vision_layers = stats.vision_layer_tokens[0] if stats.vision_layer_tokens else ()
    else:
        layers = [one["input_ids"].shape[1]] * model.config.text_config.num_hidden_layers
        vision_layers = ()
    flops = prefill_flops(model, layers, vision_layers)
    by_kind = accuracy_by_kind(answers, data)
    return accuracy(answers, data), by_kind, sum(kept) / len(kept), flops, ms


def run_benchmark(
    model: LlavaForConditionalGeneration | None = None,
    processor: LlavaProcessor | None = None,
    *,
    n_samples: int = 200,
    budgets: Iterable[int] = BUDGETS,
    methods: Iterable[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 16,
    repeats: int = 3,
    split: str = "test",
    kinds: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchmarkRow]:
    """Score the unpruned model and every method × budget on the first ``n_samples`` samples of
    ``split`` whose question kind is in ``kinds`` (default: the shipped toy model, all kinds,
    all registered methods; ``random`` averaged over ``seeds``; ``repeats=0``: no timing,
    ``prefill_ms`` None). ``progress(label)`` is called after each finished setting."""
    model = load_toy_model() if model is None else model
    processor = toy_processor() if processor is None else processor
    data = samples(split, n_samples, kinds=kinds)
    names = list(vlprune.list_methods() if methods is None else methods)
    budgets = list(budgets)
    acc, by_kind, tokens, flops, ms = _measure(model, processor, data, None, batch_size, repeats)
    rows = [BenchmarkRow("none", None, acc, 1.0, tokens, flops, ms, per_kind=by_kind)]
    if progress is not None:
        progress("none")
    for name in names:
        for budget in budgets:
            rows.append(_method_row(model, processor, data, name, budget, seeds, acc,
                                    batch_size, repeats))
            if progress is not None:
                progress(f"{name}@{budget}")
    return rows


def _method_row(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    data: Sequence[QASample],
    name: str,
    budget: int,
    seeds: Sequence[int],
    base: float,
    batch_size: int,
    repeats: int,
) -> BenchmarkRow:
    runs = []
    for options in [{"seed": s} for s in seeds] if name == "random" else [{}]:
        try:
            with vlprune.patch(model, name, budget=budget, **options) as handle:
                runs.append(_measure(model, processor, data, handle, batch_size, repeats))
        except Exception as exc:  # a method that cannot run on this model is reported, not fatal
            return BenchmarkRow(name, budget, error=f"{type(exc).__name__}: {exc}")
    accs = tuple(r[0] for r in runs)
    mean = sum(accs) / len(accs)
    per_kind = {k: statistics.mean(r[1][k] for r in runs) for k in runs[0][1]}
    return BenchmarkRow(
        name, budget, mean, mean / base if base else None, runs[0][2], runs[0][3],
        None if runs[0][4] is None else statistics.median(r[4] for r in runs),
        accs if len(accs) > 1 else (), per_kind,
    )
