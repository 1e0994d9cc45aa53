"""Per-sample pruning stats of the ``vlprune`` lmms-eval model, their summary, and what is
reported to lmms-eval."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vlprune.api import PruneStats

__all__ = ["SampleStats", "llm_flops_fn", "log_to_lmms_eval", "sample_stats", "summarise"]

@dataclass
class SampleStats:
    """Token counts of one request's prefill, without padding.

    ``prompt_tokens``: prompt length (image placeholders included); ``visual_tokens``: image
    placeholders; ``kept_tokens``: visual tokens left after the last cut; ``llm_tokens``: tokens
    into the first decoder layer; ``layer_tokens``: tokens entering each decoder layer.
    """

    images: int
    prompt_tokens: int
    visual_tokens: int
    kept_tokens: int
    llm_tokens: int
    layer_tokens: list[int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_stats(
    config: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: Sequence[int],
    stats: PruneStats | None,
) -> list[SampleStats]:
    """Per-sample counts of a left-padded batch from its inputs and the handle's ``stats``.

    ``stats`` (``None`` = unpatched) reports padded widths: a row's padding is the batch width
    after the vision cut (``kept_seq_len``) minus its own tokens, and stays the same in every
    layer (decoder cuts drop visual rows only), so it is subtracted from ``layer_tokens``.
    """
    prompt = attention_mask.sum(1).tolist()
    visual = (input_ids == config.image_token_id).sum(1).tolist()
    n_layers = config.get_text_config().num_hidden_layers
    if stats is None or not stats.visual_tokens:
        return [SampleStats(n, p, v, v, p, [p] * n_layers)
                for n, p, v in zip(images, prompt, visual)]
    into_llm = list(visual)
    if stats.kept_per_image:
        per_image = iter(stats.kept_per_image)
        into_llm = [sum(next(per_image) for _ in range(n)) for n in images]
    rows = []
    for b, (n, p, v) in enumerate(zip(images, prompt, visual)):
        llm = p - v + into_llm[b]
        pad = stats.kept_seq_len - llm
        layers = [t - pad for t in stats.layer_tokens[b]]
        rows.append(SampleStats(n, p, v, stats.kept_tokens[b], llm, layers))
    return rows


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over samples: visual, kept, LLM-input and per-layer tokens (and FLOPs if logged)."""
    summary: dict[str, Any] = {"samples": len(records)}
    for key in ("visual_tokens", "kept_tokens", "llm_tokens", "llm_prefill_flops"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = statistics.fmean(values)
    summary["mean_layer_tokens"] = statistics.fmean(
        statistics.fmean(r["layer_tokens"]) for r in records
    )
    return summary


def log_to_lmms_eval(summary: dict[str, Any], seconds: float, new_tokens: int) -> None:
    """Report one call's means through lmms-eval's metric log, which its results JSON carries
    as ``throughput["avg_vlprune_mean_*"]`` (averaged over calls, i.e. request types)."""
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    extra = {f"vlprune_{k}": v for k, v in summary.items() if k.startswith("mean_")}
    speed = new_tokens / seconds if seconds > 0 else 0.0
    log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens, avg_speed=speed,
                additional_metrics=extra)


def llm_flops_fn(model: torch.nn.Module, family: str) -> Callable[[SampleStats], float] | None:
    """Exact analytic prefill FLOPs of the decoder layers for one sample's ``layer_tokens``
    (``vlprune.eval.profiler``), or ``None`` where the profiler is not available or does not
    model the architecture (hybrid decoders)."""
    try:
        from vlprune.eval.profiler.flops import RunTokens, arch_from_config, exact_flops
    except ImportError:
        return None
    try:
        arch = arch_from_config(model.config, family)
    except NotImplementedError:
        return None
    return lambda st: exact_flops(arch, RunTokens(list(st.layer_tokens), images=[])).llm
