"""Decoder cuts through recurrent (linear-attention) layers, e.g. Qwen3.5's Gated DeltaNet.

Such a layer has no KV cache and no attention mask: it scans its input rows in order with a
recurrent state, zeroing padding rows first (``apply_mask_to_padding_states`` with the 2-D mask
``create_recurrent_attention_mask`` hands it, None when nothing is padding). After a decoder cut
it sees only the rows alive there, so its 2-D mask is gathered to those rows, and padding slots
of rows keeping fewer tokens (always on the left) are zeroed like batch padding: a zero input
leaves the zero initial state unchanged, so a padded row equals its prompt run alone. Decode
steps need nothing: the state already summarises the kept rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprune.adapters.base import Adapter


def recurrent_mask(
    mask: torch.Tensor | None, index: torch.Tensor, slots: torch.Tensor | None
) -> torch.Tensor | None:
    """The 2-D padding mask of a recurrent layer over the alive rows ``index`` (B, Lcur), with
    padding slots (``slots`` False) masked; None when every alive row is real (as transformers
    passes it)."""
    if mask is not None:
        mask = mask.gather(1, index)
    if slots is not None:
        mask = slots.long() if mask is None else mask * slots.to(mask.dtype)
    return mask


def check_recurrent_cut(adapter: Adapter, layers: Sequence[int]) -> None:
    """``ValueError`` unless every cut layer comes after the first full-attention layer of a
    hybrid decoder: that layer's cache length sizes the attention masks of later decode steps
    (``Cache.get_seq_length`` skips recurrent layers), so it must hold every prompt row."""
    recurrent = adapter.recurrent_layers
    if not recurrent or not layers:
        return
    n_layers = len(adapter.decoder_layers)
    first = next((i for i in range(n_layers) if i not in recurrent), n_layers)
    if min(layers) <= first:
        raise ValueError(
            f"on this {adapter.family} model a decoder cut must come after layer {first} (its "
            f"first full-attention layer); got cut layer(s) {sorted(layers)}"
        )
