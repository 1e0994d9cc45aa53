"""Qwen3-VL DeepStack: keep the DeepStack inputs consistent with every cut.

``Qwen3VLModel.forward`` hands the language model two extra inputs: ``visual_pos_masks`` (B, L)
bool, the visual (image and video) positions, and ``deepstack_visual_embeds``, one (V, D) tensor
per DeepStack vision layer whose rows follow the True entries of the mask in row-major order.
After decoder layer ``i < len(deepstack_visual_embeds)``, ``Qwen3VLTextModel._deepstack_process``
adds tensor ``i`` to the hidden states at the masked positions. So:

- the vision-side cut gathers the mask with the kept sequence positions and keeps the rows of the
  kept visual positions (:func:`gather_deepstack_inputs`);
- a decoder cut before the last DeepStack layer shortens the hidden states that
  ``_deepstack_process`` receives: the decoder cut shadows that method on the text model
  instance (a :class:`~vlprune.hooks.calls.Shadow`, removed on unpatch, copied with the model)
  and gathers its mask and features to the rows alive there (:func:`gather_deepstack`);
- the encoder cut restores the DeepStack mergers' outputs to full size like the main merger's
  (``vlprune.hooks.encoder``): a unit cut inside the ViT has zero features from later DeepStack
  layers and, since the vision-side cut drops it, never reaches the language model.
"""

from __future__ import annotations

from typing import Any

import torch


def gather_deepstack(
    mask: torch.Tensor, embeds: list[torch.Tensor], index: torch.Tensor, alive: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mask and DeepStack features of the sequence positions ``index`` (B, Lp).

    ``mask`` (B, L) bool, ``embeds`` (V, D) tensors with one row per True of ``mask`` (row-major);
    ``alive`` (B, Lp) bool is False on padding slots (their index is a placeholder). Returns the
    (B, Lp) mask and the tensors restricted to its True entries, in the same order.
    """
    rank = mask.flatten().long().cumsum(0).view_as(mask) - 1
    new_mask = mask.gather(1, index) & alive
    rows = rank.gather(1, index)[new_mask]
    return new_mask, [e[rows.to(e.device)] for e in embeds]


def gather_deepstack_inputs(
    kwargs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor
) -> dict[str, Any]:
    """The language model's keyword inputs with ``visual_pos_masks`` and
    ``deepstack_visual_embeds`` narrowed to a vision-side cut that keeps the sequence positions
    ``index`` (B, Lp) (``valid`` False on padding slots); unchanged without DeepStack inputs."""
    mask, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
    if mask is None or embeds is None:
        return kwargs
    mask, embeds = gather_deepstack(mask.to(index.device), list(embeds), index, valid)
    return {**kwargs, "visual_pos_masks": mask, "deepstack_visual_embeds": embeds}
