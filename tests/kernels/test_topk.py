"""Top-k selection: reference semantics, Triton == reference exactly, dispatch and validation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vlprune.kernels as kernels
from vlprune.kernels import resolve_backend, select_and_gather, select_topk

NO_CUDA = not torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[2]


def _scores(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- reference


def test_reference_picks_highest_in_index_order():
    """The k highest scores come back ascending by index."""
    assert select_topk(_scores([[0.1, 0.9, 0.5, 0.9]]), 2).tolist() == [[1, 3]]
    assert select_topk(_scores([[0.3, 0.1, 0.7, 0.2, 0.9]]), 3).tolist() == [[0, 2, 4]]


def test_reference_ties_lower_index_first():
    """Equal scores are taken lowest index first."""
    assert select_topk(_scores([[1, 1, 1, 1]]), 2).tolist() == [[0, 1]]
    assert select_topk(_scores([[0, 2, 1, 2, 2]]), 2).tolist() == [[1, 3]]


def test_reference_selection_order():
    """keep_order=False returns score-descending order, ties lower index first."""
    scores = _scores([[0.1, 0.9, 0.5, 0.9, 0.7]])
    assert select_topk(scores, 4, keep_order=False).tolist() == [[1, 3, 4, 2]]


def test_reference_mask_is_minus_inf():
    """A False mask entry behaves exactly like a -inf score."""
    scores = _scores([[0.9, 0.1, 0.8, 0.2, 0.7]])
    mask = torch.tensor([[False, True, True, False, True]])
    by_mask = select_topk(scores, 4, mask=mask)
    by_inf = select_topk(scores.masked_fill(~mask, float("-inf")), 4)
    assert by_mask.tolist() == by_inf.tolist() == [[0, 1, 2, 4]]


def test_reference_minus_inf_picked_last_lowest_index():
    """When k exceeds the finite count, -inf entries fill up lowest index first."""
    inf = float("-inf")
    assert select_topk(_scores([[inf, 0.5, inf, inf, 0.1]]), 3).tolist() == [[0, 1, 4]]


def test_reference_gather_matches_indexing():
    """Gathered rows equal hidden[b, idx[b]]."""
    scores, hidden = torch.rand(3, 50), torch.randn(3, 50, 8)
    idx, rows = select_and_gather(scores, 7, hidden)
    for b in range(3):
        assert torch.equal(rows[b], hidden[b, idx[b]])


def test_one_dimensional_input():
    """A 1-D (N,) input is one row and returns (k,) and (k, D)."""
    scores, hidden = torch.tensor([0.1, 0.9, 0.5, 0.9]), torch.randn(4, 3)
    assert select_topk(scores, 2).tolist() == [1, 3]
    idx, rows = select_and_gather(scores, 2, hidden, mask=torch.tensor([True, False, True, True]))
    assert idx.tolist() == [2, 3]
    assert torch.equal(rows, hidden[[2, 3]])


# --------------------------------------------------------------------------- triton == reference


@pytest.fixture
def triton_topk():
    """The Triton module, on a device where it can run (interpreter on CPU, compiled on CUDA)."""
    pytest.importorskip("triton")
    from vlprune.kernels import triton_topk

    if NO_CUDA and not triton_topk.INTERPRETED:
        pytest.skip("no CUDA and TRITON_INTERPRET=1 was not set before triton_topk was imported")
    return triton_topk


def _device(triton_topk) -> str:
    return "cpu" if triton_topk.INTERPRETED else "cuda"


def _check_same(scores, k, *, mask=None, dim=16, keep_order=True, **triton_kwargs):
    hidden = torch.randn(*scores.shape, dim, device=scores.device)
    want_idx, want_rows = select_and_gather(scores, k, hidden, mask=mask, backend="torch")
    if triton_kwargs:
        from vlprune.kernels.triton_topk import topk_triton

        got_idx, got_rows = topk_triton(scores, k, mask=mask, hidden=hidden, **triton_kwargs)
    else:
        got_idx, got_rows = select_and_gather(scores, k, hidden, mask=mask, backend="triton")
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got_rows, want_rows)
    want_sel = select_topk(scores, k, keep_order=keep_order, mask=mask, backend="torch")
    got_sel = select_topk(scores, k, keep_order=keep_order, mask=mask, backend="triton")
    assert torch.equal(got_sel, want_sel)


@pytest.mark.parametrize(("b", "n", "k"), [(2, 577, 64), (3, 2883, 320), (4, 64, 9)])
def test_triton_random_matches_reference(triton_topk, b, n, k):
    """Random scores (B > 1, N not a power of two): identical indices and rows."""
    gen = torch.Generator().manual_seed(n)
    _check_same(torch.randn(b, n, generator=gen).to(_device(triton_topk)), k)


@pytest.mark.parametrize("k", [1, 100, 577])
def test_triton_heavy_ties_match_reference(triton_topk, k):
    """Scores from randint(0, 3) (heavy ties), k=1 and k=N included, in both output orders."""
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 3, (3, 577), generator=gen).float().to(_device(triton_topk))
    _check_same(scores, k)
    _check_same(scores, k, keep_order=False)


def test_triton_minus_inf_and_signed_zero(triton_topk):
    """-inf entries (k above the finite count) and -0.0 == +0.0 ties follow the reference."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(-1, 2, (2, 300), generator=gen).float()
    scores[scores == -1] = float("-inf")
    scores[0, ::7] = -0.0
    finite = int(torch.isfinite(scores).sum(1).min())
    scores = scores.to(_device(triton_topk))
    for k in (finite // 2, finite + 5, 300):
        _check_same(scores, k, keep_order=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(triton_topk, dtype):
    """fp16 / bf16 scores and hidden rows come back identical to the reference."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 2883, generator=gen).to(dtype)
    scores[:, ::5] = scores[:, 1::5]  # ties after rounding
    scores = scores.to(_device(triton_topk))
    hidden = torch.randn(2, 2883, 24, generator=gen).to(dtype).to(scores.device)
    want = select_and_gather(scores, 320, hidden, backend="torch")
    got = select_and_gather(scores, 320, hidden, backend="triton")
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_triton_mask_argument(triton_topk):
    """The mask argument (also with k above the eligible count) matches the reference."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 700, generator=gen).to(_device(triton_topk))
    mask = (torch.rand(3, 700, generator=gen) < 0.3).to(scores.device)
    for k in (50, 400):
        _check_same(scores, k, mask=mask, keep_order=False)


def test_triton_chunked_rows(triton_topk):
    """Rows streamed in several chunks (block_n < N) select exactly like one block."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (2, 1500), generator=gen).float().to(_device(triton_topk))
    mask = (torch.rand(2, 1500, generator=gen) < 0.9).to(scores.device)
    _check_same(scores, 700, mask=mask, block_n=256)


def test_triton_long_row(triton_topk):
    """N = 16384 (one row, k = N // 9) matches the reference."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(1, 16384, generator=gen).to(_device(triton_topk))
    _check_same(scores, 16384 // 9, dim=4)


def test_triton_non_contiguous_hidden(triton_topk):
    """Strided hidden (a transposed view) is gathered correctly."""
    device = _device(triton_topk)
    scores = torch.randn(2, 100, device=device)
    hidden = torch.randn(2, 12, 100, device=device).transpose(1, 2)
    want = select_and_gather(scores, 30, hidden, backend="torch")
    got = select_and_gather(scores, 30, hidden, backend="triton")
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_triton_keeps_autograd(triton_topk):
    """With hidden.requires_grad the Triton backend still returns differentiable rows."""
    device = _device(triton_topk)
    scores = torch.randn(2, 40, device=device)
    hidden = torch.randn(2, 40, 6, device=device, requires_grad=True)
    idx, rows = select_and_gather(scores, 5, hidden, backend="triton")
    rows.sum().backward()
    assert torch.equal(idx, select_topk(scores, 5, backend="torch"))
    assert int(hidden.grad.sum()) == 2 * 5 * 6


def test_triton_cpu_without_interpreter_is_clear(triton_topk, monkeypatch):
    """A CPU launch without the interpreter raises a RuntimeError naming TRITON_INTERPRET."""
    monkeypatch.setattr(triton_topk, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_topk.topk_triton(torch.rand(1, 8), 2)


# --------------------------------------------------------------------------- dispatch


def test_auto_backend_picks_torch_on_cpu(monkeypatch):
    """Auto mode runs the reference on CPU tensors."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"


def test_auto_backend_picks_triton_on_cuda(monkeypatch):
    """Auto mode picks Triton for CUDA tensors when triton is installed."""
    pytest.importorskip("triton")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert resolve_backend(None, torch.device("cuda")) == "triton"


def test_env_var_forces_reference(monkeypatch):
    """VLPRUNE_KERNEL_BACKEND=torch makes auto mode use the reference, even on CUDA."""
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert resolve_backend(None, torch.device("cuda")) == "torch"
    monkeypatch.setattr(kernels, "_triton_module", lambda: pytest.fail("triton was used"))
    assert select_topk(torch.tensor([0.1, 0.9, 0.5]), 2).tolist() == [1, 2]


def test_unknown_backend_rejected(monkeypatch):
    """An unknown backend (argument or env var) raises ValueError listing the allowed values."""
    with pytest.raises(ValueError, match="torch"):
        select_topk(torch.rand(2, 5), 2, backend="cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        select_topk(torch.rand(2, 5), 2)


def test_triton_requested_without_triton(monkeypatch):
    """backend='triton' without an importable triton raises a clear RuntimeError."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "vlprune.kernels.triton_topk", raising=False)
    monkeypatch.delattr(kernels, "triton_topk", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        select_topk(torch.rand(2, 5), 2, backend="triton")


def test_import_does_not_need_triton():
    """Importing vlprune.kernels neither imports nor requires triton."""
    code = f"""
        import sys, types
        parent = types.ModuleType("vlprune")
        parent.__path__ = [{str(REPO / "vlprune")!r}]
        sys.modules["vlprune"] = parent
        sys.modules["triton"] = None
        import torch
        import vlprune.kernels as kernels
        assert kernels.select_topk(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2).tolist() == [1, 3]
        assert "vlprune.kernels.triton_topk" not in sys.modules
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("k", [0, -1, 6, 2.0, True])
def test_bad_k_rejected(k):
    """k outside 1..N (or not an int) raises ValueError naming `k` and N."""
    with pytest.raises(ValueError, match=r"`k`.*N=5"):
        select_topk(torch.rand(2, 5), k)


def test_integer_scores_rejected():
    """Integer scores raise TypeError naming `scores`."""
    with pytest.raises(TypeError, match="`scores`"):
        select_topk(torch.randint(0, 9, (2, 5)), 2)


def test_bad_shapes_rejected():
    """Mismatched hidden / mask shapes and 3-D scores raise ValueError."""
    scores = torch.rand(2, 5)
    with pytest.raises(ValueError, match="`hidden`"):
        select_and_gather(scores, 2, torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="`hidden`"):
        select_and_gather(scores, 2, torch.rand(2, 5))
    with pytest.raises(ValueError, match="`mask`"):
        select_topk(scores, 2, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="`scores`"):
        select_topk(torch.rand(1, 2, 5), 2)
    with pytest.raises(TypeError, match="`mask`"):
        select_topk(scores, 2, mask=torch.ones(2, 5))


# --------------------------------------------------------------------------- compiled (CUDA)

cuda_only = pytest.mark.skipif(NO_CUDA, reason="needs CUDA for the compiled Triton kernel")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "n", "k", "dtype"),
    [
        (8, 2880, 320, torch.float32),
        (32, 576, 64, torch.float16),
        (4, 16384, 1820, torch.float32),
        (8, 2880, 192, torch.bfloat16),
    ],
)
def test_compiled_random_matches_reference(triton_topk, b, n, k, dtype):
    """Compiled kernel == reference on random scores (incl. N=16384 and bf16)."""
    if triton_topk.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernel is not exercised")
    scores = torch.randn(b, n, device="cuda").to(dtype)
    _check_same(scores, k, dim=4096, keep_order=False)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("n", [577, 16384])
def test_compiled_ties_match_reference(triton_topk, n):
    """Compiled kernel == reference under heavy ties, with a mask, -inf and -0.0 entries."""
    if triton_topk.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernel is not exercised")
    scores = torch.randint(0, 3, (8, n), device="cuda").float()
    scores[:, ::11] = float("-inf")
    scores[:, 1::13] = -0.0
    mask = torch.rand(8, n, device="cuda") < 0.8
    for k in (1, n // 9, n // 2, n):
        _check_same(scores, k, mask=mask, keep_order=False)
