"""FLOPs / latency / memory profiler behind ``vlprune profile`` (README: "Profiling: FLOPs,
latency, memory").

- :mod:`~vlprune.eval.profiler.presets`: real architectures (LLaVA-1.5-7B, LLaVA-NeXT-7B,
  LLaVA-OneVision-7B, Qwen2-VL-7B, Qwen2.5-VL-7B, Qwen3-VL-8B, Qwen3-VL-30B-A3B and ``-mini``
  twins; configs in :mod:`~vlprune.eval.profiler.configs`) with random weights, and synthetic
  inputs;
- :mod:`~vlprune.eval.profiler.flops`: paper-compatible MACs, exact analytic FLOPs (summing
  the per-part terms of :mod:`~vlprune.eval.profiler.part_flops`) and ``FlopCounterMode``
  counting; :mod:`~vlprune.eval.profiler.meta`: counting full-size modules on the ``meta``
  device;
- :mod:`~vlprune.eval.profiler.timing`: prefill / decode / end-to-end latency, selection
  overhead and peak memory;
- :mod:`~vlprune.eval.profiler.runner` and :mod:`~vlprune.eval.profiler.report`: the sweep
  over methods x budgets and its table, JSON, CSV and PNG; :mod:`~vlprune.eval.profiler.target`
  prepares the model that runs, :mod:`~vlprune.eval.profiler.runs` runs each row.
"""

from vlprune.eval.profiler.flops import (
    Arch,
    FlopsBreakdown,
    RunTokens,
    arch_from_config,
    count_flops,
    exact_flops,
    paper_macs,
)
from vlprune.eval.profiler.meta import MetaCounter
from vlprune.eval.profiler.presets import PRESETS, Preset, load_model, synthetic_inputs
from vlprune.eval.profiler.report import format_table, write_outputs
from vlprune.eval.profiler.runner import ProfileResult, run_profile
from vlprune.eval.profiler.target import ProfileSettings

__all__ = [
    "PRESETS",
    "Arch",
    "FlopsBreakdown",
    "MetaCounter",
    "Preset",
    "ProfileResult",
    "ProfileSettings",
    "RunTokens",
    "arch_from_config",
    "count_flops",
    "exact_flops",
    "format_table",
    "load_model",
    "paper_macs",
    "run_profile",
    "synthetic_inputs",
    "write_outputs",
]
