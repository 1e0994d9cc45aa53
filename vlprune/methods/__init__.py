"""Pruning methods, one module each; importing this package registers every one of them."""

import importlib
import pkgutil

from vlprune.methods.base import DecoderBatch, Method, VisionBatch

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DecoderBatch", "Method", "VisionBatch"]
