"""Coverage maximisation (MMTok): coverage rows of a unit's candidates and the greedy over them.

Pure tensor functions (``docs/methods/mmtok.md#algorithm``): :func:`coverage_matrix` builds the
rows ``C`` of ``F(S) = Σ_r max_{j∈S} C[r, j]``, :func:`greedy_coverage` picks columns greedily,
:func:`coverage_value` evaluates ``F``.
"""

from __future__ import annotations

import torch

from vlprune.methods._vision_common import unit_rows


def coverage_matrix(
    text: torch.Tensor,
    text_mask: torch.Tensor,
    vision: torch.Tensor,
    vision_pre: torch.Tensor,
    valid: torch.Tensor,
    *,
    tv_temperature: float,
    vv_temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Coverage rows ``C = [P / m ; α Q / n]`` (G, M + N, N) float32 of G units
    (``docs/methods/mmtok.md#algorithm``).

    ``text`` (G, M, D) targets, ``text_mask`` (G, M) bool (m = its count, padding rows are 0);
    ``vision`` (G, N, D) post-projector and ``vision_pre`` (G, N, D') pre-projector features;
    ``valid`` (G, N) bool candidates (n = its count): other columns and their Q rows are 0 and
    take no part in the softmaxes. ``F(S) = Σ_r max_{j∈S} C[r, j]``.
    """
    t, v, w = (unit_rows(x, eps=1e-8) for x in (text, vision, vision_pre))
    rows = text.shape[1]
    cover = t.new_empty(t.shape[0], rows + v.shape[1], v.shape[1])
    m = text_mask.sum(1, keepdim=True).clamp_min(1)
    torch.mul(_masked_softmax(t @ v.transpose(1, 2), tv_temperature, valid),
              (text_mask / m)[..., None], out=cover[:, :rows])
    torch.mul(_masked_softmax(w @ w.transpose(1, 2), vv_temperature, valid),
              (valid * alpha / valid.sum(1, keepdim=True))[..., None], out=cover[:, rows:])
    return cover


def _masked_softmax(sim: torch.Tensor, temperature: float, valid: torch.Tensor) -> torch.Tensor:
    """``softmax(sim / temperature)`` over the last dim of ``sim`` (G, R, N), in place, with the
    columns where ``valid`` (G, N) is False left out (probability 0)."""
    sim.div_(temperature)
    if not bool(valid.all()):
        sim.masked_fill_(~valid[:, None, :], float("-inf"))
    return sim.softmax(-1)


def greedy_coverage(
    cover: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy max coverage: (G, k) picked columns in pick order, for ``cover`` (G, R, N) ≥ 0.

    Step i adds the valid, unpicked column with the largest marginal gain
    ``Σ_r max(C[r, j] - best[r], 0)`` (lowest index on ties), then ``best = max(best, C[:, j])``
    (``docs/methods/mmtok.md#algorithm``). Needs ``k`` ≤ the valid columns of every unit.
    Every step works in buffers allocated once (no per-step copies of ``cover``); one unit
    runs on 2-D tensors (fewer ops per step, the same values).
    """
    units, rows, n = cover.shape
    blocked = ~valid if valid is not None else torch.zeros(
        units, n, dtype=torch.bool, device=cover.device)
    if k == 0:
        return cover.new_zeros(units, 0, dtype=torch.long)
    if units == 1:
        return _greedy_one(cover[0], k, blocked[0])[None]
    best = cover.new_zeros(units, rows, 1)
    picks = []
    work = torch.empty_like(cover)
    for _ in range(k):
        torch.sub(cover, best, out=work).clamp_min_(0)
        pick = work.sum(1).masked_fill_(blocked, float("-inf")).argmax(1, keepdim=True)
        picks.append(pick)
        blocked.scatter_(1, pick, True)
        torch.maximum(best, cover.gather(2, pick[:, :, None].expand(units, rows, 1)), out=best)
    return torch.cat(picks, 1)


def _greedy_one(cover: torch.Tensor, k: int, blocked: torch.Tensor) -> torch.Tensor:
    """:func:`greedy_coverage` of one unit, ``cover`` (R, N), ``blocked`` (N,) bool: (k,)."""
    penalty = torch.zeros_like(cover[0]).masked_fill_(blocked, float("-inf"))
    best = cover.new_zeros(cover.shape[0], 1)
    work = torch.empty_like(cover)
    picks = []
    for _ in range(k):
        torch.sub(cover, best, out=work).clamp_min_(0)
        pick = work.sum(0).add_(penalty).argmax()
        picks.append(pick)
        penalty[pick] = float("-inf")
        torch.maximum(best, cover[:, pick, None], out=best)
    return torch.stack(picks)


def coverage_value(cover: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """(G,) objective ``F(S) = Σ_r max_{j∈S} C[r, j]`` of column sets ``picks`` (G, k)."""
    if picks.shape[1] == 0:
        return cover.new_zeros(cover.shape[0])
    index = picks[:, None, :].expand(-1, cover.shape[1], -1)
    return cover.gather(2, index).amax(2).sum(1)

