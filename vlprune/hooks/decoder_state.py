"""What the decoder cut knows about one prefill, and what a decoder-stage chooser sees.

See ``hooks/decoder.py`` for the cut itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DecoderState:
    """Rows alive in one prefill: ``index`` (B, Lcur) into the LM input, image flags.

    ``valid`` (B, Lcur) is False on batch padding and padding slots (default: all True);
    ``slots`` (B, Lcur) is False on padding slots only, None while every slot holds a real row;
    ``input_visual`` (B,): visual rows per sample entering the language model (default: those
    of ``is_image``); ``input_valid`` (B, L): the LM input's rows that are not batch padding.
    Per layer from the first cut on: ``layer_index`` / ``layer_valid`` / ``layer_slots`` of the
    rows entering it; ``choices[l]``: what the chooser answered at cut layer l and the row count
    it cut from (a replay extends it); ``replay``: (the replayed prefill's state, tokens added).
    Renumbered positions only: ``positions`` (B, Lcur) of the current rows and their ``rope``
    (cos, sin), ``shift`` (B, 1) of the last cut, ``layer_shift[l]`` of the rows entering layer l
    (None before the first cut that cut).
    """

    index: torch.Tensor
    is_image: torch.Tensor
    input_len: int
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_tokens: list[list[int]] = field(default_factory=list)
    valid: torch.Tensor | None = None
    input_visual: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    layer_slots: dict[int, torch.Tensor | None] = field(default_factory=dict)
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    input_valid: torch.Tensor | None = None
    choices: dict[int, tuple[Any, int]] = field(default_factory=dict)
    replay: tuple[DecoderState, int] | None = None
    positions: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    shift: torch.Tensor | None = None
    layer_shift: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.valid is None:
            self.valid = torch.ones_like(self.is_image)
        if self.input_visual is None:
            self.input_visual = self.is_image.sum(1)
        if self.input_valid is None:
            self.input_valid = self.valid


@dataclass
class CutContext:
    """What a decoder-stage chooser sees at cut layer ``layer``.

    ``hidden``: (B, Lcur, D) input of the layer; ``is_image``: (B, Lcur) bool, visual rows;
    ``index``: (B, Lcur) positions of the current rows in the language model's input;
    ``valid``: (B, Lcur) bool, False on batch padding (and padding slots of earlier cuts);
    ``layer_index`` / ``layer_valid``: rows (LM-input positions) that entered each earlier layer
    at or after the first cut, and which of them were real (layers before it saw every row,
    real where ``input_valid``); ``input_visual``: (B,) visual rows per sample entering the
    language model; ``input_valid``: (B, L) the LM input's rows that are not batch padding.
    """

    layer: int
    hidden: torch.Tensor
    is_image: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor | None = None
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    input_visual: torch.Tensor | None = None
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    input_valid: torch.Tensor | None = None


Chooser = Callable[[CutContext], "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None"]
"""Returns kept rows (B, Lnext), or ``(index, slots)`` for rows keeping different counts."""

