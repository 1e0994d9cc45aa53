"""How many visual tokens survive: the one place that turns ``budget`` / ``ratio`` into a count.

The vision hook, the methods, the profiler and ``PatchHandle.stats`` all call :func:`kept_count`,
so placeholder lengths, masks and reports agree by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlprune.options import as_float, as_int


@dataclass(frozen=True)
class Budget:
    """A validated budget: exactly one of ``tokens`` (kept per unit) or ``ratio`` (kept
    fraction). Python or NumPy scalars are accepted and stored as ``int`` / ``float``."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError(
                "give exactly one of `budget` (visual tokens kept, an int > 0) or "
                f"`ratio` (kept fraction in (0, 1]); got budget={self.tokens!r}, "
                f"ratio={self.ratio!r}"
            )
        if self.tokens is not None:
            tokens = as_int(self.tokens)
            if tokens is None or tokens <= 0:
                raise ValueError(f"`budget` must be an int > 0, got {self.tokens!r}")
            object.__setattr__(self, "tokens", tokens)
        if self.ratio is not None:
            ratio = as_float(self.ratio)
            if ratio is None or not 0.0 < ratio <= 1.0:
                raise ValueError(f"`ratio` must be a number in (0, 1], got {self.ratio!r}")
            object.__setattr__(self, "ratio", ratio)

    def kept(self, n_tokens: int) -> int:
        """Kept count for a unit (image, crop or request) of ``n_tokens`` visual tokens."""
        return kept_count(n_tokens, budget=self.tokens, ratio=self.ratio)

    def as_dict(self) -> dict[str, int | float | None]:
        """``{"budget": ..., "ratio": ...}`` for reports."""
        return {"budget": self.tokens, "ratio": self.ratio}


def kept_count(n_tokens: int, *, budget: int | None = None, ratio: float | None = None) -> int:
    """Visual tokens kept out of ``n_tokens``.

    ``budget`` keeps ``min(budget, n_tokens)`` (a budget larger than the unit keeps all of it);
    ``ratio`` keeps ``ceil(ratio * n_tokens)``, at least 1. A unit with no tokens keeps none.
    """
    if n_tokens <= 0:
        return 0
    if budget is not None:
        return min(int(budget), n_tokens)
    if ratio is None:
        raise ValueError("kept_count needs `budget` or `ratio`")
    return min(n_tokens, max(1, math.ceil(float(ratio) * n_tokens - 1e-9)))
