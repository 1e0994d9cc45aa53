"""What a patch pruned in the last prefill: :class:`PruneStats` (``PatchHandle.stats``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PruneStats:
    """What the last forward pass pruned (prefill), per sample unless named otherwise.

    ``visual_tokens``: image placeholders in the prompt; ``kept_tokens``: visual tokens that
    reach the language model (after the last decoder cut for decoder-side methods);
    ``kept_per_image``: visual tokens into the LLM per image (vision-side cut); ``seq_len`` /
    ``kept_seq_len``: sequence length before / after the vision-side cut (padded batch width);
    ``layer_tokens``: sequence length entering each decoder layer.
    ``vision_layer_tokens``: per image, rows entering each vision-encoder layer in the last
    image forward (summed over its crops / frames, CLS included); empty without an encoder cut.
    The last prefill is the calling thread's: threads sharing a patched model each see their
    own.
    """

    method: str
    settings: dict[str, Any]
    visual_tokens: list[int] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    kept_per_image: list[int] = field(default_factory=list)
    seq_len: int = 0
    kept_seq_len: int = 0
    layer_tokens: list[list[int]] = field(default_factory=list)
    vision_layer_tokens: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view (JSON-serialisable)."""
        return asdict(self)
