"""One shared gather: apply kept sequence positions to embeddings, masks and positions."""

from __future__ import annotations

import torch


def left_packed_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a (B, L) bool keep-mask into gather indices, left-padding shorter rows.

    Returns ``index`` (B, Lp) of kept positions in ascending order, where Lp is the largest
    kept count of any row, and ``valid`` (B, Lp) bool: False on the left padding slots of rows
    that keep fewer (their index points at position 0 and must be masked out).
    """
    length = keep.shape[1]
    positions = torch.arange(length, device=keep.device).expand_as(keep)
    ordered = torch.where(keep, positions, -1).sort(dim=1).values
    kept_len = int(keep.sum(dim=1).max())
    index = ordered[:, length - kept_len:]
    valid = index >= 0
    return index.clamp(min=0), valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``x`` (B, L, ...) along dim 1 with ``index`` (B, Lp) → (B, Lp, ...)."""
    expand = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(
        *index.shape, *x.shape[2:]
    )
    return x.gather(1, expand)


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids (B, L) or (R, B, L) (M-RoPE rows) on the last dim with (B, Lp)."""
    if position_ids.dim() == 2:
        return position_ids.expand(index.shape[0], -1).gather(1, index)
    rows = position_ids.shape[0]
    full = position_ids.expand(rows, index.shape[0], -1)
    return full.gather(2, index.unsqueeze(0).expand(rows, -1, -1))


def gather_mask(
    mask: torch.Tensor | None, index: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The 2-D attention mask of the kept rows; padding slots get 0. Never returns None."""
    if mask is None:
        return valid.long()
    return mask.gather(1, index) * valid.to(mask.dtype)
