"""What the encoder cut knows about one image forward: its sequences, units and what survived.

See ``hooks/encoder.py`` for the cut itself; a unit is what may be dropped (a CLIP patch row,
a Qwen 2×2 merge group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlprune.adapters.base import ImageLayout
from vlprune.hooks.calls import Encode


@dataclass
class EncoderState:
    """The sequences of one image forward and the units still alive in them.

    Per sequence s: ``image[s]`` (prompt order), ``sizes[s]`` units before any cut,
    ``unit_ids[s]`` (sizes[s],) raster id of each original unit in row order, ``kept[s]``
    ascending row-order positions of the current units. ``rows``: uncut rows per sequence
    (batched) or in all (packed); ``layer_rows[s][l]``: rows of s entering layer l.
    """

    layouts: list[ImageLayout]
    image: list[int]
    sizes: list[int]
    unit_ids: list[torch.Tensor]
    kept: list[torch.Tensor]
    packed: bool
    prefix: int
    group: int
    rows: int
    layer_rows: list[list[int]]
    memory: dict[str, Any] = field(default_factory=dict)
    cut: bool = False

    def units(self) -> list[torch.Tensor]:
        """Per sequence, the raster ids of the current units in row order."""
        return [ids[k] for ids, k in zip(self.unit_ids, self.kept)]

    def offsets(self) -> list[int]:
        """Per sequence, its first unit's position among all original units (packed order)."""
        starts = [0]
        for size in self.sizes[:-1]:
            starts.append(starts[-1] + size)
        return starts

    def bounds(self) -> list[int]:
        """Cumulative current row boundaries of the sequences (packed encoders)."""
        out = [0]
        for k in self.kept:
            out.append(out[-1] + k.numel() * self.group)
        return out

    def kept_units(self) -> torch.Tensor:
        """Packed encoders: (U_cur,) ascending positions of the current units among all."""
        return torch.cat([start + k for start, k in zip(self.offsets(), self.kept)])

    def kept_rows(self) -> torch.Tensor:
        """Packed encoders: (S_cur,) ascending original rows of the current units."""
        units = self.kept_units()
        step = torch.arange(self.group, device=units.device)
        return (units[:, None] * self.group + step).flatten()


@dataclass
class EncoderCutContext:
    """What an encoder chooser sees after layer ``layer`` ran (fields as in
    :class:`~vlprune.methods.base.EncoderBatch`, without the probes)."""

    layer: int
    output_layer: int
    hidden: torch.Tensor
    units: list[torch.Tensor]
    sizes: list[int]
    image: list[int]
    layouts: list[ImageLayout]
    packed: bool
    bounds: list[int] | None
    prefix: int
    group: int
    memory: dict[str, Any]


EncoderChooser = Callable[[EncoderCutContext], "list[torch.Tensor] | None"]
"""Returns, per sequence, sorted local positions of the units that stay (None: keep all)."""


def remap_seqlens(cu_seqlens: torch.Tensor, kept_rows: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries over the original rows → over ``kept_rows`` (ascending
    original rows that remain); segments left empty disappear."""
    cuts = torch.searchsorted(kept_rows, cu_seqlens.to(kept_rows.device, torch.long))
    return torch.unique_consecutive(cuts).to(cu_seqlens.dtype)


def checked_state(encode: Encode | None, layouts: list[ImageLayout]) -> EncoderState:
    """The encoder state of ``encode`` for images ``layouts``; ``RuntimeError`` when the
    encoder cut did not run for them."""
    state = encode.encoder if encode is not None else None
    ok = state is not None and [lay.num_tokens for lay in state.layouts] == [
        lay.num_tokens for lay in layouts
    ]
    if not ok:
        raise RuntimeError(
            "the encoder cut has no record of these images: they must be encoded inside the "
            "same forward or `model.generate` call (features passed precomputed, from a direct "
            "`get_image_features` call, or a `generate` bound before vlprune.patch cannot be "
            "pruned inside the vision encoder)"
        )
    return state
