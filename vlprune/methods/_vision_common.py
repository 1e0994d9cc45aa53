"""Shared pieces of the vision-encoder attention methods (``hiprune``, ``hired``, ``globalcom2``).

Side-effect free (registers nothing). Three jobs:

- layers: turn an official layer index into one of the probed model (:func:`resolve_layer`,
  :func:`scale_layer`), and refuse an encoder without the class token a method scores by
  (:func:`require_class_token`);
- geometry: where each vision sequence's patches sit in an image's token layout
  (:func:`partition_tokens`; LLaVA-NeXT thumbnail, crops, unpadding, newline tokens) and which
  thumbnail cells cover which crop (:func:`thumbnail_regions`); Qwen patches → merged tokens
  (:func:`merged_token_scores`);
- budgets: split a count exactly (:func:`apportion`) and meet an image's budget exactly whatever
  the newline policy (:func:`fill_budget`);
- features: float32 unit rows for similarity-based methods (:func:`unit_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from vlprune.adapters.base import Adapter, ImageLayout

NEWLINE_POLICIES = ("drop", "row", "all")
ContentSelector = Callable[[int], torch.Tensor]
"""``c -> `` sorted layout indices of ``c`` content (non-newline) tokens of one image."""


def resolve_layer(layer: int, depth: int, option: str) -> int:
    """0-based index of ``layer`` (negative counts from the end) in a ``depth``-layer encoder."""
    if not -depth <= layer < depth:
        raise ValueError(f"`{option}`={layer} is out of range for a {depth}-layer vision encoder")
    return layer % depth


def scale_layer(layer: int, ref_depth: int, depth: int) -> int:
    """Official 0-based ``layer`` of a ``ref_depth``-layer encoder on a ``depth``-layer one:
    ``floor(layer · depth / ref_depth)`` (identity at the reference depth; keeps relative depth)."""
    return layer * depth // ref_depth


def require_class_token(method: str, adapter: Adapter) -> None:
    """``TypeError`` unless ``adapter``'s vision encoder has a class token (row 0 of every
    sequence), for methods that score patches by its attention."""
    if not adapter.has_cls:
        raise TypeError(
            f"method {method!r} scores patches by the class token's attention, and this "
            f"{type(adapter.model).__name__} has no class token: use hiprune, todre or flowcut "
            "(attention received / the mean query instead)"
        )



def sequences_per_image(layout: ImageLayout) -> int:
    """Vision sequences (CLIP forwards) of one image: 1, or thumbnail + crops for LLaVA-NeXT."""
    if layout.crop_grid is None:
        return 1
    return 1 + layout.crop_grid[0] * layout.crop_grid[1]


def split_per_image(
    seqs: list[torch.Tensor], layouts: list[ImageLayout]
) -> list[list[torch.Tensor]]:
    """Group the per-sequence tensors of a CLIP probe by image (each image's crops in order)."""
    counts = [sequences_per_image(layout) for layout in layouts]
    if sum(counts) != len(seqs):
        raise RuntimeError(
            f"the vision probe saw {len(seqs)} sequences but the images need {sum(counts)}"
        )
    out, start = [], 0
    for n in counts:
        out.append(seqs[start:start + n])
        start += n
    return out


def canvas_tokens(layout: ImageLayout, device: torch.device | None = None) -> torch.Tensor:
    """(H, W) layout index of the token each cell of the unpadded high-res patch canvas
    becomes, ``-1`` for cells that become no token of their own.

    Canvas row R of the token canvas (``highres``, h × w) occupies layout indices
    ``prefix + grid_tokens + R·(w + 1) + [0, w)``, its newline token the last one. Without
    downsampling the patch canvas is the token canvas. LLaVA-OneVision's ``anyres_max`` bilinear
    downsampling (``highres_source`` = (H, W) > (h, w)) mixes several patches into each token:
    token (R, C) is assigned to the patch at its centre, ``(⌊(R + ½)·H/h⌋, ⌊(C + ½)·W/w⌋)``, so
    each token belongs to exactly one patch and the other patches map to ``-1``.
    """
    height, width = layout.highres
    start = layout.prefix + layout.grid_tokens
    tokens = start + torch.arange(height, device=device)[:, None] * (width + 1) + torch.arange(
        width, device=device)
    if layout.highres_source is None:
        return tokens
    src_h, src_w = layout.highres_source
    ys = ((torch.arange(height, device=device) + 0.5) * src_h / height).floor().long()
    xs = ((torch.arange(width, device=device) + 0.5) * src_w / width).floor().long()
    canvas = torch.full((src_h, src_w), -1, dtype=torch.long, device=device)
    canvas[ys[:, None], xs[None, :]] = tokens
    return canvas


def partition_tokens(layout: ImageLayout, device: torch.device | None = None) -> list[torch.Tensor]:
    """Per vision sequence of the image (thumbnail, then crops in raster order): (rows·cols,)
    layout index of each patch in raster order, ``-1`` where unpadding removed it (or, on a
    downsampled LLaVA-OneVision canvas, where it is no token's centre: :func:`canvas_tokens`).

    AnyRes crop (i, j), patch (r, c) sits on the unpadded canvas at
    ``(i·rows + r - top, j·cols + c - left)``.
    """
    rows, cols = layout.grid
    base = layout.prefix + torch.arange(rows * cols, device=device)
    if layout.crop_grid is None or layout.highres is None:
        return [base]
    canvas = canvas_tokens(layout, device)
    height, width = canvas.shape
    top, left = layout.highres_offset
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    out = [base]
    for i in range(layout.crop_grid[0]):
        for j in range(layout.crop_grid[1]):
            y, x = i * rows + r - top, j * cols + c - left
            inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            token = canvas[y.clamp(0, height - 1), x.clamp(0, width - 1)]
            out.append(torch.where(inside, token, -1).flatten())
    return out


def gather_partitions(
    tokens: list[torch.Tensor], counts: list[int], pick: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """Sorted layout indices ``tokens[p][pick(p, counts[p])]`` over partitions p (a partition
    with count 0 is skipped); ``pick`` returns local patch indices."""
    kept = [tokens[p][pick(p, n)] for p, n in enumerate(counts) if n > 0]
    if not kept:
        return torch.empty(0, dtype=torch.long, device=tokens[0].device)
    return torch.cat(kept).sort().values


def newline_tokens(layout: ImageLayout, device: torch.device | None = None) -> torch.Tensor:
    """Layout indices of the newline tokens (one per high-res row), in row order."""
    if not layout.newline or layout.highres is None:
        return torch.empty(0, dtype=torch.long, device=device)
    height, width = layout.highres
    start = layout.prefix + layout.grid_tokens
    return start + torch.arange(height, device=device) * (width + 1) + width


def thumbnail_regions(grid: tuple[int, int], crop_grid: tuple[int, int]) -> torch.Tensor:
    """(rows·cols,) crop index (raster) covering each thumbnail cell: the (rows, cols) thumbnail
    is cut into ``crop_grid`` rectangles of ``floor(rows / n_h)`` × ``floor(cols / n_w)`` cells,
    the last band / column taking the remainder (GlobalCom²'s ``generate_scale_for_crop_features``
    rule)."""
    (rows, cols), (n_h, n_w) = grid, crop_grid
    band = torch.clamp(torch.arange(rows) // max(rows // n_h, 1), max=n_h - 1)
    column = torch.clamp(torch.arange(cols) // max(cols // n_w, 1), max=n_w - 1)
    return (band[:, None] * n_w + column[None, :]).flatten()


def merged_token_scores(
    patch_scores: torch.Tensor, token_of_patch: torch.Tensor, layouts: list[ImageLayout]
) -> list[torch.Tensor]:
    """Per image, (N_i,) mean of the pre-merge patch scores (P,) of each merged token."""
    total = sum(layout.num_tokens for layout in layouts)
    token_of_patch = token_of_patch.to(patch_scores.device)
    if token_of_patch.numel() != patch_scores.numel() or int(token_of_patch.max()) >= total:
        raise RuntimeError("the vision probe's patches do not match the images' tokens")
    sums = torch.zeros(total, device=patch_scores.device)
    sums.index_add_(0, token_of_patch, patch_scores.float())
    counts = torch.bincount(token_of_patch, minlength=total).clamp_min(1)
    return list((sums / counts).split([layout.num_tokens for layout in layouts]))


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (≥ 0), each at most its cap,
    summing to ``total`` exactly: largest remainders get the leftover units (ties: lower index);
    what a capped part cannot take is re-split over the others. All-zero weights split equally.
    Needs ``0 ≤ total ≤ sum(caps)``."""
    if not 0 <= total <= sum(caps):
        raise ValueError(f"cannot split {total} over parts holding {sum(caps)}")
    alloc = [0] * len(caps)
    active = [i for i, cap in enumerate(caps) if cap > 0]
    remaining = total
    while remaining > 0:
        w = [max(float(weights[i]), 0.0) for i in active]
        if sum(w) <= 0:
            w = [1.0] * len(active)
        shares = [remaining * x / sum(w) for x in w]
        parts = [math.floor(s) for s in shares]
        order = sorted(range(len(active)), key=lambda j: (parts[j] - shares[j], j))
        for j in order[: remaining - sum(parts)]:
            parts[j] += 1
        remaining = 0
        for j, i in enumerate(active):
            give = min(parts[j], caps[i] - alloc[i])
            alloc[i] += give
            remaining += parts[j] - give
        active = [i for i in active if alloc[i] < caps[i]]
    return alloc


def _canvas_rows(idx: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """High-res row of each layout index in ``idx`` (thumbnail / prefix tokens dropped)."""
    start = layout.prefix + layout.grid_tokens
    return (idx[idx >= start] - start) // (layout.highres[1] + 1)


def fill_budget(
    layout: ImageLayout,
    k: int,
    n_content: int,
    content: ContentSelector,
    newline: str,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Exactly ``k`` sorted layout indices of one image (on ``device``): content tokens from
    ``content(c)`` plus newline and prefix tokens by the ``newline`` policy.

    - ``"drop"``: content first; prefix, newline, then suffix tokens only fill a budget above
      ``n_content``, in order.
    - ``"row"``: a newline is kept iff its row keeps a token; ``c`` is the largest count with
      ``c + rows(c) ≤ k`` (binary search); any unit left over keeps newlines of empty rows.
    - ``"all"``: every newline is kept and content gets ``k - rows``; a budget of at most
      ``rows`` tokens falls back to ``"row"``.
    """
    newlines = newline_tokens(layout, device)
    n_rows = newlines.numel()
    if n_rows == 0 or newline == "drop" or k >= n_content + n_rows:
        c = min(k, n_content)
        suffix = layout.num_tokens - layout.suffix + torch.arange(layout.suffix, device=device)
        fill = torch.cat([torch.arange(layout.prefix, device=device), newlines, suffix])
        return torch.cat([content(c).to(device), fill[: k - c]]).sort().values
    if newline == "all" and k > n_rows:
        return torch.cat([content(k - n_rows).to(device), newlines]).sort().values
    lo, hi = max(0, k - n_rows), min(k, n_content)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + _canvas_rows(content(mid), layout).unique().numel() <= k:
            lo = mid
        else:
            hi = mid - 1
    idx = content(lo).to(device)
    touched = torch.zeros(n_rows, dtype=torch.bool, device=device)
    touched[_canvas_rows(idx, layout)] = True
    extra = newlines[~touched][: k - lo - int(touched.sum())]
    return torch.cat([idx, newlines[touched], extra]).sort().values


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """A float32 copy of ``x`` (..., D) with L2-unit rows: ``F.normalize(x.float(), dim=-1,
    eps=eps)`` computed in place in the copy (one buffer instead of two)."""
    x = x.to(torch.float32, copy=True)
    return x.div_(x.norm(2, -1, keepdim=True).clamp_min(eps))
