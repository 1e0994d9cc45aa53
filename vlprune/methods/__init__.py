"""Pruning methods; importing this package registers them all."""

from vlprune.methods import fastv, fixed, random, uniform  # noqa: F401  (registration)
from vlprune.methods.base import Method, VisionBatch

__all__ = ["Method", "VisionBatch"]
