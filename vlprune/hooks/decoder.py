"""The decoder cut: drop visual rows inside the language model at one or more decoder layers.

Pre-hooks on every decoder layer from the first cut layer on. In prefill, at a cut layer the
chooser returns which current rows survive; that layer and every later one then sees gathered
``hidden_states`` (cut layers only), ``position_embeddings`` (cos and sin), ``position_ids`` and
a 4-D ``attention_mask`` (rows and columns). Layers before the first cut keep the full sequence.
In decode, each layer's materialised mask keeps the columns of the keys its own cache holds:
``cat(kept_index, arange(L, kv_len))``. The cache's reported length stays layer 0's, which keeps
``generate``'s bookkeeping consistent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter
from vlprune.hooks.gather import gather_positions, gather_rows


@dataclass
class DecoderState:
    """Rows alive in the current prefill: ``index`` (B, Lcur) into the LM input, image flags."""

    index: torch.Tensor
    is_image: torch.Tensor
    input_len: int
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_tokens: list[list[int]] = field(default_factory=list)


@dataclass
class CutContext:
    """What a decoder-stage chooser sees at cut layer ``layer``.

    ``hidden``: (B, Lcur, D) input of the layer; ``is_image``: (B, Lcur) bool, visual rows;
    ``index``: (B, Lcur) positions of the current rows in the language model's input.
    """

    layer: int
    hidden: torch.Tensor
    is_image: torch.Tensor
    index: torch.Tensor


Chooser = Callable[[CutContext], "torch.Tensor | None"]


def gather_mask_4d(
    mask: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor
) -> torch.Tensor:
    """Gather a (B|1, H|1, Q, K) mask on query rows (B, Q') (None: all) and key columns (B, K')."""
    batch = cols.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(batch, heads, mask.shape[2], cols.shape[1]))


class DecoderCut:
    """Installs the layer pre-hooks; ``chooser`` returns kept rows (B, Lnext) at cut layers."""

    def __init__(self, adapter: Adapter, layers: Sequence[int], chooser: Chooser,
                 image_mask: Callable[[], torch.Tensor | None]) -> None:
        n_layers = len(adapter.decoder_layers)
        bad = [layer for layer in layers if not 0 < layer < n_layers]
        if bad:
            raise ValueError(f"cut layers {bad} outside 1..{n_layers - 1} (the model has {n_layers})")
        self.adapter = adapter
        self.layers = sorted(set(layers))
        self.chooser = chooser
        self.image_mask = image_mask
        self.state: DecoderState | None = None
        self.prefill = False

    def install(self) -> list[RemovableHandle]:
        """Register one pre-hook on the language model and one per layer ≥ the first cut."""
        handles = [self.adapter.language_model.register_forward_pre_hook(
            self._start, with_kwargs=True)]
        for i in range(self.layers[0], len(self.adapter.decoder_layers)):
            layer = self.adapter.decoder_layers[i]
            handles.append(layer.register_forward_pre_hook(partial(self._layer, i), with_kwargs=True))
        return handles

    @property
    def layer_tokens(self) -> list[list[int]]:
        """Per sample, the sequence length entering each decoder layer in the last prefill."""
        return self.state.layer_tokens if self.state is not None else []

    def _start(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache")
        self.prefill = cache is None or cache.get_seq_length() == 0
        if not self.prefill:
            return
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        is_image = self.image_mask()
        if is_image is None or is_image.shape != (batch, length):
            self.state = None
            return
        index = torch.arange(length, device=embeds.device).expand(batch, length)
        n_layers = len(self.adapter.decoder_layers)
        self.state = DecoderState(index, is_image, length,
                                  layer_tokens=[[length] * n_layers for _ in range(batch)])

    def _layer(self, i: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        if state is None:
            return None
        if not self.prefill:
            return self._decode(i, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self.layers:
            local = self.chooser(CutContext(i, hidden, state.is_image, state.index))
            if local is not None:
                hidden = gather_rows(hidden, local)
                state.index = state.index.gather(1, local)
                state.is_image = state.is_image.gather(1, local)
        state.layer_index[i] = state.index
        for row in state.layer_tokens:
            row[i] = state.index.shape[1]
        return self._gather_prefill(args, kwargs, hidden, state.index)

    @staticmethod
    def _gather_prefill(args: tuple, kwargs: dict, hidden: torch.Tensor,
                        index: torch.Tensor) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        cos, sin = kwargs["position_embeddings"]
        batch = index.shape[0]
        kwargs["position_embeddings"] = (
            gather_rows(cos.expand(batch, *cos.shape[1:]), index),
            gather_rows(sin.expand(batch, *sin.shape[1:]), index),
        )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = gather_positions(kwargs["position_ids"], index)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = gather_mask_4d(mask, index, index)
        return args, kwargs

    def _decode(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = kwargs.get("attention_mask")
        state = self.state
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 4) or state is None:
            return None
        index = state.layer_index[i]
        kv_len = mask.shape[-1]
        new = torch.arange(state.input_len, kv_len, device=mask.device).expand(index.shape[0], -1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = gather_mask_4d(mask, None, torch.cat([index, new], 1))
        return args, kwargs
