"""Pure-torch top-k selection: the definition every other backend must match exactly.

Rule: order by score descending, ties broken by lower index first, take the first ``k``.
Inputs are already validated and 2-D here (see :mod:`vlprune.kernels`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_scores(scores: Tensor, mask: Tensor | None) -> Tensor:
    """``scores`` (B, N) with ineligible entries (``mask`` False) set to ``-inf``."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, float("-inf"))


def topk_indices(scores: Tensor, k: int, *, keep_order: bool, mask: Tensor | None) -> Tensor:
    """(B, k) int64 indices of the ``k`` best entries of ``scores`` (B, N).

    ``keep_order=True`` returns them ascending; otherwise in selection order.
    """
    ranked = torch.sort(masked_scores(scores, mask), dim=-1, descending=True, stable=True)
    picked = ranked.indices[:, :k]
    if keep_order:
        picked = picked.sort(dim=-1).values
    return picked


def selection_order(scores: Tensor, idx: Tensor, mask: Tensor | None) -> Tensor:
    """Reorder ascending ``idx`` (B, k) into selection order (score desc, lower index first).

    A stable descending sort of the picked scores keeps ascending-index order among ties.
    """
    picked = masked_scores(scores, mask).gather(-1, idx)
    order = torch.sort(picked, dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order)


def gather_rows(hidden: Tensor, idx: Tensor) -> Tensor:
    """Rows ``hidden[b, idx[b]]``: (B, N, D) and (B, k) -> (B, k, D)."""
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def select_and_gather(
    scores: Tensor, k: int, hidden: Tensor, *, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Ascending top-k indices (B, k) and the gathered rows of ``hidden`` (B, k, D)."""
    idx = topk_indices(scores, k, keep_order=True, mask=mask)
    return idx, gather_rows(hidden, idx)
