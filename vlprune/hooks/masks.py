"""4-D attention masks for cut rows: gather rows and key columns, hide padding slots, build
a causal mask over cache slots in the convention of the attention implementation."""

from __future__ import annotations

import torch


def gather_mask_4d(
    mask: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor
) -> torch.Tensor:
    """Gather a (B|1, H|1, Q, K) mask on query rows (B, Q') (None: all) and key columns (B, K')."""
    batch = cols.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    if rows is not None:
        rows = rows[:, None, :, None].expand(batch, heads, rows.shape[1], mask.shape[3])
        mask = mask.gather(2, rows)
    cols = cols[:, None, None, :].expand(batch, heads, mask.shape[2], cols.shape[1])
    return mask.gather(3, cols)


def mask_slots(
    mask: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor | None
) -> torch.Tensor:
    """Mask out key columns where ``keys`` (B, K) is False in a 4-D (B, H, Q, K) mask (bool: True
    = attend; float: additive). ``queries`` (B, Q) (prefill, Q == K) gives the padding slots'
    rows their own diagonal back."""
    allowed = keys[:, None, None, :]
    if mask.dtype == torch.bool:
        out = mask & allowed
    else:
        out = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
    if queries is None:
        return out
    eye = torch.eye(queries.shape[1], dtype=torch.bool, device=mask.device)
    own = eye[None, None] & ~queries[:, None, :, None]
    return out | own if out.dtype == torch.bool else out.masked_fill(own, 0.0)


def causal_slot_mask(
    keys: torch.Tensor, n_queries: int, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """A materialised (B, 1, Q, K) causal mask over cache slots: the Q queries are the last Q
    slots, key j is visible to query i when ``j <= i`` and ``keys`` (B, K) is True; padding slots
    among the queries see themselves. ``kind``: "bool" (sdpa) or "float" (eager, additive)."""
    n_keys = keys.shape[1]
    key_pos = torch.arange(n_keys, device=keys.device)
    query_pos = key_pos[n_keys - n_queries:]
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None, None] & keys[:, None, None, :]
    padding_query = ~keys[:, None, n_keys - n_queries:, None]
    allowed = allowed | ((key_pos[None, :] == query_pos[:, None])[None, None] & padding_query)
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
