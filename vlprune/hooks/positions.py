"""Positions of the kept rows after a cut: the original ones, or renumbered contiguously.

``positions="original"`` (the default) keeps every kept row at its original RoPE position.
``positions="renumber"`` is what most official implementations on LLaVA do: after a cut, the
real rows of each sequence are numbered ``p0, p0 + 1, …`` in order (``p0``: the position of the
sequence's first real row, 0 under ``generate``), and every later token (decode steps, follow-up
turns) continues right after the renumbered prompt: its position moves down by the sequence's
``shift``, how far the last prompt token moved. 1-D RoPE positions only (LLaMA / Vicuna, and
LLaVA-OneVision's Qwen2):
``vlprune.patch`` refuses ``"renumber"`` on M-RoPE (Qwen) models.
"""

from __future__ import annotations

import torch

POSITIONS = ("original", "renumber")


def renumber(positions: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous positions for the ``real`` rows of each sequence.

    ``positions`` (B|1, L) 1-D positions of the rows, in sequence order; ``real`` (B, L) bool,
    False on padding rows and padding slots. Returns the new (B, L) positions (a row that is not
    real gets its predecessor's number; it is masked) and ``shift`` (B, 1): old − new position
    of the last real row.
    """
    positions = positions.expand_as(real)
    rank = (real.long().cumsum(1) - 1).clamp(min=0)
    first = real.long().argmax(1, keepdim=True)
    new = positions.gather(1, first) + rank
    last = real.shape[1] - 1 - real.flip(1).long().argmax(1, keepdim=True)
    return new, positions.gather(1, last) - new.gather(1, last)

