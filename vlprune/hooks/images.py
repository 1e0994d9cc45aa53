"""The images of one prefill: where their placeholders are, their layouts, repeated rows.

``generate(num_beams=r)`` / ``num_return_sequences=r`` encodes each prompt's images once and then
repeats every prompt row r times: :func:`prompt_layouts` recognises that (rows identical in
groups of r, the encode's image count matching one row per prompt), so a selection runs once per
prompt and is repeated, never computed on another prompt's signals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.calls import Encode


@dataclass
class ImageTokens:
    """The images of one prefill: per image its layout, sequence positions (N_i,) and row.

    ``input_ids`` (B, L) is None when the prompt came as ``inputs_embeds``;
    ``attention_mask`` (B, L) the 2-D padding mask (None: no padding); ``encode``: the image
    encode of this prefill (None when the features were passed precomputed).
    """

    layouts: list[ImageLayout]
    positions: list[torch.Tensor]
    sample: list[int]
    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None = None
    encode: Encode | None = None

    def features(self) -> list[torch.Tensor]:
        """Per image, its (N_i, D) rows of ``inputs_embeds``: a view where the image's
        placeholders are consecutive (the usual prompt), else a copy."""
        out = []
        for s, p in zip(self.sample, self.positions):
            first = int(p[0]) if p.numel() else 0
            consecutive = p.numel() == 0 or int(p[-1]) - first + 1 == p.numel()
            out.append(self.inputs_embeds[s, first:first + p.numel()] if consecutive
                       else self.inputs_embeds[s, p])
        return out


def split_images(
    is_image: torch.Tensor, layouts: list[ImageLayout]
) -> tuple[list[torch.Tensor], list[int]]:
    """Assign the placeholder positions (``is_image``, (B, L)) of each row to consecutive
    images, in order."""
    positions: list[torch.Tensor] = []
    sample: list[int] = []
    image = 0
    for row in range(is_image.shape[0]):
        row_pos = is_image[row].nonzero().squeeze(1)
        start = 0
        while start < row_pos.numel():
            if image >= len(layouts):
                raise ValueError("more image placeholders than images in the inputs")
            size = layouts[image].num_tokens
            positions.append(row_pos[start:start + size])
            sample.append(row)
            start += size
            image += 1
        if start != row_pos.numel():
            raise ValueError(f"row {row}: image placeholders do not split into whole images")
    return positions, sample


def repeated_rows(x: torch.Tensor, r: int) -> bool:
    """True when the rows of ``x`` (B, ...) come in groups of ``r`` identical consecutive rows."""
    if r == 1:
        return True
    if x.shape[0] % r:
        return False
    groups = x.reshape(x.shape[0] // r, r, *x.shape[1:])
    return bool((groups == groups[:, :1]).all())


def prompt_layouts(adapter: Adapter, is_image: torch.Tensor, rows: torch.Tensor,
                   layout_inputs: dict[str, Any],
                   expected: int | None) -> tuple[int, list[ImageLayout]]:
    """(r, layouts of the images of one row per prompt), r > 1 when the prompt rows ``rows``
    ((B, L) ids or (B, L, D) embeddings, image placeholders ``is_image``) repeat every prompt r
    times; ``expected``: images encoded for the prefill (None: unknown, precomputed features)."""
    counts = is_image.sum(1).tolist()
    first_error: ValueError | None = None
    for r in range(1, len(counts) + 1):
        if len(counts) % r or not repeated_rows(rows, r):
            continue
        try:
            layouts = adapter.image_layouts(layout_inputs, sum(counts[::r]))
        except ValueError as error:
            first_error = first_error or error
            continue
        if expected is None or len(layouts) == expected:
            return r, layouts
    if first_error is not None and expected is None:
        raise first_error
    raise ValueError(
        f"the prompt's {sum(counts)} image placeholders in {len(counts)} rows do not match "
        f"the {expected} image(s) encoded for it"
    ) from first_error


def kept_rows(is_image: torch.Tensor, positions: list[torch.Tensor], sample: list[int],
              kept: list[torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: every text row, and the image rows a selection kept (``kept[i]``: local
    indices into image i's ``positions[i]`` in row ``sample[i]``)."""
    keep = ~is_image
    rows = torch.cat([torch.full_like(k, s) for s, k in zip(sample, kept)])
    cols = torch.cat([p[k] for p, k in zip(positions, kept)])
    keep[rows, cols] = True
    return keep
