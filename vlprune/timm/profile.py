"""``vlprune profile --model timm:<name>``: FLOPs and latency of a timm ViT per method x budget.

The model is built by ``timm.create_model(name, pretrained=False)``: random weights, nothing
downloaded (cost does not depend on weight values). One row for the unpatched model, then one per
(method, budget) patched with ``cut_block``; methods that refuse a timm ViT get an ``n/a`` row.

- FLOPs, analytic (:func:`vit_flops`): every matrix product of the forward (patch embedding,
  each block's linears on the rows entering it, attention ``4·n²·heads·head_dim``, attention
  pooling, the head), from the handle's per-block row counts; counted: ``FlopCounterMode`` on
  the same forward (CPU sdpa included), the method's own selection counted apart and left out,
  so ``counted_vs_analytic`` is 1.
- Latency: median (and quartiles) of ``repeats`` forwards after ``warmup`` untimed ones; the
  selection's own time inside them is reported apart.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import vlprune
from vlprune.cli_args import CommandError
from vlprune.eval.profiler.flops import flop_counter
from vlprune.eval.profiler.report import write_csv, write_json
from vlprune.eval.profiler.runner import ProfileResult
from vlprune.eval.profiler.target import ProfileSettings
from vlprune.eval.profiler.timing import SelectionMeter, Spread

PREFIX = "timm:"


def _linear_flops(module: nn.Module) -> int:
    """FLOPs of every ``nn.Linear`` inside ``module`` on one row."""
    return sum(2 * m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))


def _pool_flops(pool: nn.Module, tokens: int) -> float:
    """timm ``AttentionPoolLatent`` over ``tokens`` rows: keys / values on every row, the rest
    on the latent queries."""
    latents = pool.latent.shape[1]
    attention = 4 * latents * tokens * pool.num_heads * pool.head_dim
    rest = _linear_flops(pool) - _linear_flops(pool.kv)
    return tokens * _linear_flops(pool.kv) + latents * rest + attention


def vit_flops(model: nn.Module, block_rows: Sequence[int], out_rows: int, patches: int) -> float:
    """Analytic FLOPs of one image through a timm ViT (module doc): ``block_rows[l]`` rows enter
    block l, ``out_rows`` leave the last one (prefix included), ``patches`` patch tokens."""
    conv = model.patch_embed.proj
    total = 2.0 * patches * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size)
    for block, n in zip(model.blocks, block_rows):
        attn = block.attn
        total += n * _linear_flops(block) + 4 * n * n * attn.num_heads * attn.head_dim
    heads = _linear_flops(model) - _linear_flops(model.blocks)
    if model.attn_pool is not None:
        heads -= _linear_flops(model.attn_pool)
        kept_prefix = 0 if model.pool_include_prefix else model.num_prefix_tokens
        total += _pool_flops(model.attn_pool, out_rows - kept_prefix)
    return total + heads


def build_timm_model(spec: str, image_size: tuple[int, int] | None = None) -> nn.Module:
    """``timm:<name>`` → ``timm.create_model(name, pretrained=False)`` (random weights), eval;
    ``image_size`` (width, height) sets ``img_size``."""
    try:
        import timm
    except ImportError:
        raise ValueError("timm is not installed: pip install 'vlprune[timm]' (or run "
                         "scripts/setup_timm.sh and use .venv-timm)") from None
    name = spec.removeprefix(PREFIX)
    kwargs = {} if image_size is None else {"img_size": (image_size[1], image_size[0])}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


class _Runner:
    def __init__(self, settings: ProfileSettings, model: nn.Module, cut_block: int | None):
        self.s = settings
        self.model = model
        self.cut_block = cut_block
        h, w = model.patch_embed.img_size
        generator = torch.Generator().manual_seed(settings.seed)
        self.x = torch.randn(settings.batch, 3, h, w, generator=generator).to(settings.device)
        self.patches = math.prod(model.patch_embed.grid_size)

    @torch.no_grad()
    def _timed(self, meter: SelectionMeter | None) -> dict[str, Any]:
        if self.s.timing is False:
            return {}
        for _ in range(self.s.warmup):
            self.model(self.x)
        times, select = [], []
        for _ in range(self.s.repeats):
            if meter is not None:
                meter.reset()
            _sync(self.x.device)
            start = time.perf_counter()
            self.model(self.x)
            _sync(self.x.device)
            times.append((time.perf_counter() - start) * 1e3)
            if meter is not None:
                select.append(meter.ms)
        return {"ms": _spread(times), "select_ms": _spread(select) if select else None}

    @torch.no_grad()
    def _counted(self, meter: SelectionMeter | None) -> float | None:
        if not self.s.count:
            self.model(self.x)
            return None
        if meter is not None:
            meter.count = True
            meter.reset()
        with flop_counter() as counter:
            self.model(self.x)
        if meter is not None:
            meter.count = False
        return counter.get_total_flops() - (meter.flops if meter is not None else 0.0)

    def _row(self, row: dict[str, Any], rows: list[int], out_rows: int, kept: int,
             counted: float | None) -> dict[str, Any]:
        analytic = vit_flops(self.model, rows, out_rows, self.patches) * self.s.batch
        return {**row, "patch_tokens": self.patches, "kept_tokens": kept, "block_rows": rows,
                "gflops": analytic / 1e9,
                "counted_gflops": None if counted is None else counted / 1e9,
                "counted_vs_analytic": None if counted is None else counted / analytic}

    def baseline(self) -> dict[str, Any]:
        counted = self._counted(None)
        rows = [self.model.num_prefix_tokens + self.patches] * len(self.model.blocks)
        row = {"method": "baseline", "budget": None, "status": "ok", "note": ""}
        return {**self._row(row, rows, rows[-1], self.patches, counted), **self._timed(None)}

    def method(self, name: str, budget: int | float) -> dict[str, Any]:
        row: dict[str, Any] = {"method": name, "budget": budget, "status": "ok", "note": ""}
        amount = {"ratio": budget} if isinstance(budget, float) else {"budget": budget}
        try:
            handle = vlprune.patch(self.model, name, cut_block=self.cut_block, **amount)
        except (ValueError, TypeError) as err:
            return {**row, "status": "n/a", "note": str(err)}
        meter = SelectionMeter(handle.method, self.x.device)
        try:
            counted = self._counted(meter)
            stats = handle.stats
            row = self._row(row, stats.vision_layer_tokens[0], stats.kept_seq_len,
                            stats.kept_tokens[0], counted)
            row["select_gflops"] = meter.flops / 1e9 if self.s.count else None
            row.update(self._timed(meter))
        finally:
            meter.remove()
            handle.unpatch()
        return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(samples: list[float]) -> dict[str, float]:
    spread = Spread.of(samples)
    return {"median": spread.median, "p25": spread.p25, "p75": spread.p75}


def run_timm_profile(settings: ProfileSettings, cut_block: int | None = None,
                     model: nn.Module | None = None) -> ProfileResult:
    """Profile ``settings.model`` (``timm:<name>``, or the given ``model``): the baseline, then
    every method x budget (module doc); ``methods=None``: every registered method that runs on
    a timm ViT."""
    methods = settings.methods if settings.methods is not None else vlprune.list_methods()
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        model = model if model is not None else build_timm_model(settings.model,
                                                                 settings.image_size)
        # frozen: FlopCounterMode's module tracker fails on parameter views made under no_grad
        model = model.requires_grad_(False).to(settings.device, settings.torch_dtype())
        runner = _Runner(settings, model, cut_block)
        runner.x = runner.x.to(settings.torch_dtype())
        jobs = [("baseline", None)] + [(m, b) for m in methods for b in settings.budgets]
        from tqdm.auto import tqdm

        rows = []
        for name, budget in tqdm(jobs, desc="vlprune profile", unit="run", file=sys.stderr,
                                 disable=not settings.progress):
            rows.append(runner.baseline() if budget is None else runner.method(name, budget))
        if settings.methods is None:  # every registered method: keep those a timm ViT takes
            rows = [row for row in rows if row["status"] != "n/a"]
        _ratios(rows)
        info = {"model": settings.model, "device": settings.device,
                "dtype": str(settings.torch_dtype()), "threads": torch.get_num_threads(),
                "batch": settings.batch, "image_size": list(model.patch_embed.img_size),
                "patch_tokens": runner.patches, "prefix_tokens": model.num_prefix_tokens,
                "blocks": len(model.blocks), "cut_block": cut_block,
                "torch": torch.__version__, "vlprune": vlprune.__version__}
        return ProfileResult(rows, info)
    finally:
        torch.set_num_threads(threads)


def _ratios(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    for row in rows:
        if row["status"] != "ok":
            continue
        row["flops_ratio"] = base["gflops"] / row["gflops"]
        if row.get("ms") and base.get("ms"):
            row["speedup"] = base["ms"]["median"] / row["ms"]["median"]


def format_timm_table(result: ProfileResult) -> str:
    """Markdown table: one line per run (``n/a`` rows carry their reason)."""
    head = ("| method | budget | kept | rows into last block | GFLOPs | counted / analytic | "
            "FLOPs ratio | ms | speed-up |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        budget = "—" if r["budget"] is None else f"{r['budget']}"
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {budget} | {r['status']} | "
                         f"{r['note'].splitlines()[0][:70]} | | | | | |")
            continue
        counted = "—" if r["counted_vs_analytic"] is None else f"{r['counted_vs_analytic']:.3f}"
        ms = r.get("ms")
        timing = ("—", "—") if not ms else (
            f"{ms['median']:.1f} ±{(ms['p75'] - ms['p25']) / 2:.1f}", f"{r['speedup']:.2f}×")
        lines.append(f"| {r['method']} | {budget} | {r['kept_tokens']} | {r['block_rows'][-1]} "
                     f"| {r['gflops']:.3g} | {counted} | {r['flops_ratio']:.2f}× | {timing[0]} "
                     f"| {timing[1]} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    """``vlprune profile --model timm:<name>``: print the table, write JSON and CSV."""
    settings = ProfileSettings(
        model=args.model, methods=args.methods, budgets=args.budgets, device=args.device,
        dtype=args.dtype, warmup=args.warmup, repeats=args.repeats, batch=args.batch,
        image_size=args.image_size, timing=args.timing, count=not args.no_count,
        progress=not args.no_progress, seed=args.seed, threads=args.threads,
    )
    try:
        result = run_timm_profile(settings, cut_block=args.cut_block)
    except ValueError as err:
        raise CommandError(str(err)) from None
    info = result.info
    print(f"{info['model']} · {info['device']} ({info['threads']} threads) · {info['dtype']} · "
          f"batch {info['batch']} · {info['patch_tokens']} patch + {info['prefix_tokens']} "
          f"prefix tokens · {info['blocks']} blocks · cut after block "
          f"{'last' if args.cut_block is None else args.cut_block}")
    print(format_timm_table(result))
    print("GFLOPs: analytic forward FLOPs (2 per MAC, full attention), the selection left out; "
          "counted / analytic: FlopCounterMode over the analytic count. ms: median ±half-IQR.")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, write in (("profile.json", write_json), ("profile.csv", write_csv)):
        write(result, args.out / name)
        print(f"{name.split('.')[1]}: {args.out / name}", file=sys.stderr)
