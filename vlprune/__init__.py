"""vlprune: training-free visual-token pruning for Hugging Face vision-language models.

``handle = vlprune.patch(model, "random", budget=64)`` prunes every later forward / generate of
``model``; ``handle.stats`` reports kept tokens; ``handle.unpatch()`` (or
``vlprune.unpatch(model)``) restores the model; ``vlprune.get_handle(model)`` finds the handle.
"""

from vlprune import methods  # noqa: F401  (registers the methods)
from vlprune.api import (
    AlreadyPatchedError,
    PatchHandle,
    PruneStats,
    available_methods,
    get_handle,
    patch,
    unpatch,
)
from vlprune.budget import kept_count
from vlprune.registry import list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "AlreadyPatchedError",
    "PatchHandle",
    "PruneStats",
    "available_methods",
    "get_handle",
    "kept_count",
    "list_methods",
    "patch",
    "register_method",
    "unpatch",
]
