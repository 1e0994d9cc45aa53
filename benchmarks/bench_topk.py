"""Time ``select_and_gather``: the fused Triton kernel against the torch reference.

    python benchmarks/bench_topk.py [--device cuda|cpu] [--repeats N] [--quick]

Prints a markdown table of median times (CUDA events on GPU, ``time.perf_counter`` on CPU), the
torch / triton ratio and whether both backends return identical indices and rows. Scores are
float32, hidden states bfloat16 (B, N, D). On CPU only the reference is timed, plus the Triton
interpreter on the smallest cases when ``TRITON_INTERPRET=1`` is set and ``--quick`` is given
(interpreter timings only show that it runs; they say nothing about GPU speed).
:func:`compare_case` also times what a user would write, ``torch.topk`` + sort + gather
(``benchmarks/gpu_suite.py`` reports it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from vlprune.kernels import select_and_gather

HEADLINE = (8, 2880, 320)
INTERPRETER_MAX_N = 576
INTERPRETER_MAX_B = 8


def cases(quick: bool) -> list[tuple[int, int, int]]:
    """(B, N, k) grid: the headline case first, then B x N x k in {64, 192, N // 9}."""
    batches = (1, 8) if quick else (1, 8, 32)
    grid = [
        (b, n, k) for b in batches for n in (576, 2880, 16384) for k in sorted({64, 192, n // 9})
    ]
    return [HEADLINE, *(case for case in grid if case != HEADLINE)]


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def topk_sort_gather(scores: torch.Tensor, k: int,
                     hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain torch way: ``torch.topk`` indices, sorted ascending, rows gathered."""
    idx = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values
    return idx, hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def compare_case(device: torch.device, b: int, n: int, k: int, dim: int,
                 repeats: int) -> dict[str, object]:
    """Median ms of the Triton kernel, the torch reference and ``torch.topk`` + sort + gather on
    one (B, N, k, D) case, and whether the kernel's indices and rows equal each of them."""
    gen = torch.Generator(device=device).manual_seed(b * n + k)
    scores = torch.randn(b, n, device=device, generator=gen)
    hidden = torch.randn(b, n, dim, device=device, generator=gen, dtype=torch.bfloat16)
    runs = {
        "triton": lambda: select_and_gather(scores, k, hidden, backend="triton"),
        "reference": lambda: select_and_gather(scores, k, hidden, backend="torch"),
        "topk_sort_gather": lambda: topk_sort_gather(scores, k, hidden),
    }
    got = runs["triton"]()
    record: dict[str, object] = {"B": b, "N": n, "k": k, "D": dim}
    for name, fn in runs.items():
        want = fn()
        record[f"{name}_ms"] = median_ms(fn, device, repeats)
        if name != "triton":
            record[f"equal_{name}"] = all(torch.equal(g, w) for g, w in zip(got, want))
    record["speedup_vs_topk"] = record["topk_sort_gather_ms"] / record["triton_ms"]
    record["speedup_vs_reference"] = record["reference_ms"] / record["triton_ms"]
    return record


def triton_runs(device: torch.device, quick: bool, b: int, n: int) -> bool:
    """Whether the Triton backend is timed for this case on this device."""
    if device.type == "cuda":
        return True
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return quick and interpreted and n <= INTERPRETER_MAX_N and b <= INTERPRETER_MAX_B


def bench_case(
    device: torch.device, b: int, n: int, k: int, dim: int, repeats: int, quick: bool
) -> str:
    """One markdown table row for (B, N, k)."""
    gen = torch.Generator(device=device).manual_seed(b * n + k)
    scores = torch.randn(b, n, device=device, generator=gen)
    hidden = torch.randn(b, n, dim, device=device, generator=gen, dtype=torch.bfloat16)
    ref = select_and_gather(scores, k, hidden, backend="torch")
    torch_ms = median_ms(
        lambda: select_and_gather(scores, k, hidden, backend="torch"), device, repeats
    )
    if not triton_runs(device, quick, b, n):
        return f"| {b} | {n} | {k} | {dim} | {torch_ms:.3f} | - | - | - |"
    got = select_and_gather(scores, k, hidden, backend="triton")
    same = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    triton_ms = median_ms(
        lambda: select_and_gather(scores, k, hidden, backend="triton"), device, repeats
    )
    ratio = torch_ms / triton_ms
    return (
        f"| {b} | {n} | {k} | {dim} | {torch_ms:.3f} | {triton_ms:.3f} | {ratio:.3g}x "
        f"| {'yes' if same else 'NO'} |"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cuda", "cpu"), default=default)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    parser.add_argument("--quick", action="store_true", help="B <= 8, D = 128, 5 repeats")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dim = 128 if args.quick else 4096
    repeats = args.repeats or (5 if args.quick else 50)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"select_and_gather on {name}: median of {repeats}, scores fp32, hidden bf16\n")
    print("| B | N | k | D | torch ms | triton ms | torch/triton | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for b, n, k in cases(args.quick):
        print(bench_case(device, b, n, k, dim, repeats, args.quick), flush=True)


if __name__ == "__main__":
    main()
