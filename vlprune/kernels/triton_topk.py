"""Fused Triton top-k select (+ optional row gather): one launch per call, one program per row.

Per row the kernel
1. maps every score to a monotone ``uint32`` key (fp16/bf16 are widened to fp32 first, ``-0.0``
   is folded onto ``+0.0``, ineligible entries become ``-inf``);
2. finds the k-th largest key ``T`` by building it bit by bit from the MSB: a bit is kept when
   at least ``k`` keys are ``>=`` the candidate (32 counting passes);
3. keeps every key ``> T`` plus the ``k - count(> T)`` lowest-index keys ``== T`` and writes their
   positions in ascending order, output slots coming from prefix sums (``tl.cumsum``);
4. optionally copies the selected ``D``-wide rows of ``hidden`` in ``BLOCK_K x BLOCK_D`` tiles.

Rows up to ``MAX_BLOCK_N`` entries are held in registers for the whole search; longer rows are
streamed in ``MAX_BLOCK_N`` chunks. On CPU this only runs under ``TRITON_INTERPRET=1`` set before
this module is imported.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK_N = 16384
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _keys(scores_ptr, mask_ptr, offs, N, HAS_MASK: tl.constexpr):
    """Monotone uint32 keys of one block of a row; 0 (below every real key) past the row end."""
    inb = offs < N
    x = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_MASK:
        eligible = tl.load(mask_ptr + offs, mask=inb, other=0)
        x = tl.where(eligible != 0, x, float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.uint32, bitcast=True)
    keys = tl.where((bits & 0x80000000) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(inb, keys, tl.zeros_like(keys))


@triton.jit
def _above(keys, cand, STRICT: tl.constexpr):
    """Number of ``keys`` above ``cand`` (``>`` when STRICT, else ``>=``)."""
    if STRICT:
        return tl.sum((keys > cand).to(tl.int32), axis=0)
    return tl.sum((keys >= cand).to(tl.int32), axis=0)


@triton.jit
def _count(
    scores_ptr,
    mask_ptr,
    keys,
    cand,
    N,
    HAS_MASK: tl.constexpr,
    STRICT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    """Keys of the row above ``cand``; ``keys`` is the whole row when NUM_CHUNKS == 1."""
    if NUM_CHUNKS == 1:
        count = _above(keys, cand, STRICT)
    else:
        count = tl.zeros([], tl.int32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK_N + tl.arange(0, BLOCK_N)
            chunk = _keys(scores_ptr, mask_ptr, offs, N, HAS_MASK)
            count += _above(chunk, cand, STRICT)
    return count


@triton.jit
def _kth_key(
    scores_ptr,
    mask_ptr,
    keys,
    N,
    K,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    """The k-th largest key of the row: the largest ``T`` with ``count(keys >= T) >= K``."""
    thr = tl.full([], 0, tl.uint32)
    bit = tl.full([], 0x80000000, tl.uint32)
    for _ in range(32):
        cand = thr | bit
        count = _count(scores_ptr, mask_ptr, keys, cand, N, HAS_MASK, False, BLOCK_N, NUM_CHUNKS)
        thr = tl.where(count >= K, cand, thr)
        bit = bit >> 1
    return thr


@triton.jit
def _emit(keys, offs, thr, need_eq, eq_seen, base, idx_ptr):
    """Store the selected positions of one block at slots ``base + rank``; return new counters."""
    eq = (keys == thr).to(tl.int32)
    eq_rank = eq_seen + tl.cumsum(eq, axis=0) - eq
    sel = ((keys > thr) | ((eq != 0) & (eq_rank < need_eq))).to(tl.int32)
    slot = base + tl.cumsum(sel, axis=0) - sel
    tl.store(idx_ptr + slot, offs.to(tl.int64), mask=sel != 0)
    return eq_seen + tl.sum(eq, axis=0), base + tl.sum(sel, axis=0)


@triton.jit
def _gather(
    idx_ptr,
    hidden_ptr,
    out_ptr,
    K,
    D,
    stride_hn,
    stride_hd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy rows ``hidden[idx[j]]`` to ``out[j]`` for the row's ``K`` stored indices."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        rows = tl.load(idx_ptr + ks, mask=kmask, other=0)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            tile = kmask[:, None] & (ds < D)[None, :]
            src = hidden_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd
            vals = tl.load(src, mask=tile)
            tl.store(out_ptr + ks[:, None].to(tl.int64) * D + ds[None, :], vals, mask=tile)


@triton.jit
def _topk_kernel(
    scores_ptr,
    mask_ptr,
    idx_ptr,
    hidden_ptr,
    out_ptr,
    N,
    K,
    D,
    stride_s,
    stride_m,
    stride_hb,
    stride_hn,
    stride_hd,
    HAS_MASK: tl.constexpr,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per row: select the row's top-K positions (ascending) and gather rows."""
    row = tl.program_id(0).to(tl.int64)
    scores_ptr += row * stride_s
    mask_ptr += row * stride_m
    idx_ptr += row * K
    offs = tl.arange(0, BLOCK_N)
    keys = _keys(scores_ptr, mask_ptr, offs, N, HAS_MASK)
    thr = _kth_key(scores_ptr, mask_ptr, keys, N, K, HAS_MASK, BLOCK_N, NUM_CHUNKS)
    need_eq = K - _count(scores_ptr, mask_ptr, keys, thr, N, HAS_MASK, True, BLOCK_N, NUM_CHUNKS)
    eq_seen, base = _emit(keys, offs, thr, need_eq, 0, 0, idx_ptr)
    for c in range(1, NUM_CHUNKS):
        offs = c * BLOCK_N + tl.arange(0, BLOCK_N)
        keys = _keys(scores_ptr, mask_ptr, offs, N, HAS_MASK)
        eq_seen, base = _emit(keys, offs, thr, need_eq, eq_seen, base, idx_ptr)
    if HAS_HIDDEN:
        tl.debug_barrier()
        _gather(
            idx_ptr,
            hidden_ptr + row * stride_hb,
            out_ptr + row * K * D,
            K,
            D,
            stride_hn,
            stride_hd,
            BLOCK_K,
            BLOCK_D,
        )


def _num_warps(block_n: int) -> int:
    return 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16


def topk_triton(
    scores: Tensor,
    k: int,
    *,
    mask: Tensor | None = None,
    hidden: Tensor | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Ascending top-k indices (B, k) int64 and, with ``hidden`` (B, N, D), its rows (B, k, D).

    Inputs must already be validated (2-D ``scores``, bool ``mask``, matching ``hidden``).
    ``block_n`` (a power of two) overrides the row chunk size; it exists to test the chunked path.
    """
    if scores.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the triton backend on CPU needs TRITON_INTERPRET=1 set before "
            "vlprune.kernels.triton_topk is imported; use backend='torch' on CPU"
        )
    b, n = scores.shape
    idx = torch.empty((b, k), dtype=torch.int64, device=scores.device)
    rows = None if hidden is None else hidden.new_empty((b, k, hidden.shape[-1]))
    if b > 0:
        block = block_n or min(triton.next_power_of_2(n), MAX_BLOCK_N)
        on_cuda = scores.device.type == "cuda"
        with torch.cuda.device(scores.device) if on_cuda else contextlib.nullcontext():
            _launch(scores.contiguous(), mask, hidden, idx, rows, block)
    return idx, rows


def _launch(
    scores: Tensor,
    mask: Tensor | None,
    hidden: Tensor | None,
    idx: Tensor,
    rows: Tensor | None,
    block: int,
) -> None:
    """Run :func:`_topk_kernel` on a (B,) grid; unused pointers get dummy tensors."""
    (b, n), k = scores.shape, idx.shape[1]
    mask_arg = scores if mask is None else mask.contiguous().view(torch.uint8)
    d = 0 if hidden is None else hidden.shape[-1]
    _topk_kernel[(b,)](
        scores,
        mask_arg,
        idx,
        scores if hidden is None else hidden,
        idx if rows is None else rows,
        n,
        k,
        d,
        scores.stride(0),
        mask_arg.stride(0),
        *((0, 0, 0) if hidden is None else hidden.stride()),
        HAS_MASK=mask is not None,
        HAS_HIDDEN=hidden is not None,
        BLOCK_N=block,
        NUM_CHUNKS=triton.cdiv(n, block),
        BLOCK_K=32,
        BLOCK_D=min(triton.next_power_of_2(max(d, 1)), 256),
        num_warps=_num_warps(block),
    )
