"""The method interface: a registered class that turns captured signals into kept indices.

Methods are pure: they see tensors (features, attention rows, layouts) and return sorted, unique
``LongTensor`` indices. They never touch the model; hooks apply their decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.budget import Budget
from vlprune.kernels import select_topk


@dataclass
class VisionBatch:
    """What a vision-stage method sees in one prefill; lists are per image, in prompt order.

    - ``layouts[i]``: token layout of image i (grid, crops, newlines).
    - ``keep[i]``: how many of its tokens image i keeps (from the method's :meth:`Method.budgets`).
    - ``features[i]``: (N_i, D) image embeddings after the projector / merger.
    - ``sample[i]``: batch row that holds image i; ``input_ids``: (B, L) the prompt.
    - ``signals``: what the method's :meth:`Method.signals` asked for, keyed by name.
    - ``text_embeds``: (B, L, D) input embeddings of the prompt (image rows included).
    - ``probes``: the probes of :meth:`Method.probes`, after the vision encoder ran (e.g.
      ``probes["cls"].rows(queries)`` of a vision attention probe).
    """

    layouts: list[ImageLayout]
    keep: list[int]
    features: list[torch.Tensor]
    sample: list[int]
    input_ids: torch.Tensor
    text_embeds: torch.Tensor
    probes: dict[str, Any]


@dataclass
class DecoderBatch:
    """What a decoder-stage method sees at cut layer ``layer`` of one prefill.

    - ``hidden``: (B, L, D) input of the layer; ``is_image``: (B, L) bool, visual rows;
    - ``probes``: the probes of :meth:`Method.probes`; a text attention probe at an earlier
      layer gives ``probes[name].rows(queries)`` → (B, H, Q, L) over the current rows.
    """

    layer: int
    hidden: torch.Tensor
    is_image: torch.Tensor
    probes: dict[str, Any]


def keep_rows(scores: torch.Tensor, is_image: torch.Tensor, keep_visual: int) -> torch.Tensor:
    """Kept rows (B, L - drop) keeping every text row and the best-scored visual rows.

    Every row drops the same number of visual tokens, ``drop = min_b(n_visual_b) - keep_visual``,
    so a batch stays rectangular; rows with more visual tokens keep more of them.
    ``scores`` (B, L) ranks the visual rows (higher = kept).
    """
    n_visual = int(is_image.sum(1).min())
    drop = max(0, n_visual - keep_visual)
    ranked = scores.float().masked_fill(~is_image, torch.finfo(torch.float32).max)
    return select_topk(ranked, is_image.shape[1] - drop)


class Method:
    """Base class of pruning methods; subclasses register with ``@register_method(name)``.

    Class attributes: ``stage`` ("vision", "decoder" or "vision+decoder"), ``scope`` (what one
    unit of ``budget`` counts: "image" or "request"), ``paper`` and ``repo`` (citations) and
    ``families`` (supported adapter families, ``None`` = all).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "vision"
    scope: ClassVar[str] = "image"
    paper: ClassVar[str] = ""
    repo: ClassVar[str] = ""
    internal: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...] | None] = None

    def check_model(self, adapter: Adapter) -> None:
        """Raise ``ValueError`` at patch time if this method cannot run on ``adapter``'s model."""
        if self.families is not None and adapter.family not in self.families:
            raise ValueError(
                f"method {self.name!r} supports {', '.join(self.families)}; "
                f"got a {adapter.family} model"
            )

    def budgets(self, layouts: list[ImageLayout], budget: Budget) -> list[int]:
        """Kept tokens per image; default: the budget applies to each image on its own."""
        return [budget.kept(layout.num_tokens) for layout in layouts]

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Kept token indices per image: sorted, unique ``LongTensor (keep[i],)``."""
        raise NotImplementedError(f"{type(self).__name__} has no vision stage")

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Signals to capture during the forward, by name: probes made by the adapter
        (``adapter.vision_probe(l)``, ``adapter.text_probe(l)``, ``adapter.projector_probe()``).
        The handle installs them and clears them after each language-model forward."""
        return {}

    def cut_layers(self, n_layers: int) -> list[int]:
        """Decoder layers at whose input the decoder stage drops rows (decoder methods)."""
        return []

    def choose(self, ctx: DecoderBatch, budget: Budget) -> torch.Tensor | None:
        """Rows kept at cut layer ``ctx.layer``: sorted (B, Lnext) indices into the current rows."""
        raise NotImplementedError(f"{type(self).__name__} has no decoder stage")

    def settings(self) -> dict[str, Any]:
        """The method's effective options, for ``handle.stats``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
