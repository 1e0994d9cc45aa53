"""The causal-LM loss of a pruned forward: ``model(**inputs, labels=...)``.

A pruned prefill returns logits for the kept rows only, so transformers' loss (labels shifted
by one against the full sequence) would not line up. Two hooks on the top-level model take
``labels`` out of the forward's keyword arguments and, after it, compute the loss with the
model's own ``loss_function``: each kept row predicts the token that follows it in the
*original* sequence (its ``shift_labels``); padding slots predict nothing (-100). A forward
that pruned nothing gets exactly transformers' loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.state import PatchPart, ThreadLocal, eager_hook

IGNORE = -100

Positions = Callable[[], "tuple[torch.Tensor, torch.Tensor] | None"]
"""Original positions (B, Lf) of the rows the logits cover, and (B, Lf) False on padding slots;
None when the forward pruned nothing."""


def next_token_labels(
    labels: torch.Tensor, positions: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """(B, Lf) label of the token after each kept row: ``labels[b, positions[b, j] + 1]``
    (-100 past the end and on padding slots, ``real`` False)."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], 1)
    return shifted.gather(1, positions.to(labels.device)).masked_fill(
        ~real.to(labels.device), IGNORE
    )


class KeptRowsLoss(PatchPart):
    """Installs the two hooks on ``model``; ``positions`` tells where the kept rows came from."""

    _labels = ThreadLocal()

    def __init__(self, model: nn.Module, positions: Positions) -> None:
        self.model = model
        self.positions = positions

    def install(self) -> list[RemovableHandle]:
        """Register the hooks; the caller keeps the handles."""
        return [
            self.model.register_forward_pre_hook(self._take, with_kwargs=True),
            self.model.register_forward_hook(self._loss, with_kwargs=True, always_call=True),
        ]

    @eager_hook
    def _take(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._labels = None
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        self._labels = kwargs.pop("labels")
        return args, kwargs

    @eager_hook
    def _loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, self._labels = self._labels, None
        if labels is None or output is None:
            return None
        logits = output["logits"] if isinstance(output, dict) else output[0]
        extra = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        kept = self.positions()
        if kept is None:
            loss = module.loss_function(logits=logits, labels=labels,
                                        vocab_size=logits.shape[-1], **extra)
        else:
            positions, real = kept
            keep_last = kwargs.get("logits_to_keep", 0)
            if isinstance(keep_last, int) and keep_last > 0:
                positions, real = positions[:, -keep_last:], real[:, -keep_last:]
            loss = module.loss_function(
                logits=logits, labels=None, vocab_size=logits.shape[-1],
                shift_labels=next_token_labels(labels, positions, real), **extra,
            )
        if isinstance(output, dict):
            output["loss"] = loss
            return output
        return (loss, *output)
