"""What a profile runs: its settings, and the model and inputs prepared for them.

Where the model runs:

- mini presets, real checkpoints, and full-size presets on CUDA: the model itself; counted
  FLOPs from ``FlopCounterMode`` on its prefill (selection FLOPs counted apart).
- full-size presets on CPU (a 7B forward is out of reach), unless timing is forced: the
  preset's ``-mini`` twin, which has the same token geometry and depth, runs the method to
  obtain the token counts; analytic FLOPs use the full-size sizes, counted FLOPs come from the
  full-size modules on the ``meta`` device (:mod:`~vlprune.eval.profiler.meta`), and latency is
  not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlprune.eval.profiler.flops import Arch, arch_from_config
from vlprune.eval.profiler.meta import MetaCounter
from vlprune.eval.profiler.presets import (
    PRESETS,
    ImageGeometry,
    ProfileModel,
    build_preset_model,
    image_geometry,
    load_model,
    synthetic_inputs,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ProfileSettings:
    """What to profile and how (the ``vlprune profile`` options).

    ``methods=None``: every registered method. ``dtype="auto"``: float32 on CPU, bfloat16 on
    CUDA. ``timing=None``: on, except for full-size presets on CPU (FLOPs only, from the mini
    twin's token counts); ``timing=True`` builds and times even a full-size preset on CPU.
    ``threads``: ``torch.set_num_threads`` for the run (CPU timings on a busy machine are far
    steadier with 1). ``decode_repeats``: timed ``generate`` calls (None: ``repeats``).
    """

    model: str
    methods: list[str] | None = None
    budgets: list[int | float] = field(default_factory=lambda: [64, 128, 192])
    device: str = "cpu"
    dtype: str = "auto"
    attn: str = "sdpa"
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    batch: int = 1
    image_size: tuple[int, int] | None = None
    text_tokens: int = 64
    timing: bool | None = None
    count: bool = True
    progress: bool = True
    seed: int = 0
    threads: int | None = None
    decode_repeats: int | None = None

    def torch_dtype(self) -> torch.dtype:
        """The dtype to build the model in."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be auto or one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]



@dataclass
class _Target:
    """The model that runs, the sizes FLOPs are reported for, and how FLOPs are counted."""

    runner: ProfileModel
    arch: Arch
    geometry: ImageGeometry
    inputs: dict[str, torch.Tensor]
    timing: bool
    meta: MetaCounter | None
    counted_source: str | None


def _prepare(settings: ProfileSettings, model: ProfileModel | None) -> _Target:
    dtype = settings.torch_dtype()
    preset = PRESETS.get(settings.model)
    on_cpu = not settings.device.startswith("cuda")
    twin = (model is None and preset is not None and not preset.mini and on_cpu
            and settings.timing is not True)
    image = settings.image_size or (preset.image_size if preset else None)
    meta = None
    if twin:
        runner = load_model(preset.twin, device=settings.device, dtype=dtype,
                            attn_implementation=settings.attn)
        full = build_preset_model(preset, device="meta", attn_implementation=settings.attn)
        config, family = full.config, preset.family
        meta = MetaCounter(full, family) if settings.count else None
        source = "meta device (full-size modules)" if meta else None
    else:
        runner = model or load_model(settings.model, device=settings.device, dtype=dtype,
                                     attn_implementation=settings.attn)
        config, family = runner.config, runner.family
        source = "FlopCounterMode on the prefill" if settings.count else None
    image = image or runner.image_size
    inputs = synthetic_inputs(runner.config, family, image_size=image,
                              text_tokens=settings.text_tokens, batch=settings.batch,
                              seed=settings.seed, device=settings.device, dtype=dtype)
    timing = settings.timing if settings.timing is not None else not twin
    return _Target(runner, arch_from_config(config, family), image_geometry(config, family, image),
                   inputs, timing, meta, source)

