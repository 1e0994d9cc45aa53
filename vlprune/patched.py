"""The live handles: the one active :class:`~vlprune.handle.PatchHandle` of each patched model.

:func:`registered` / :func:`register` keep it, and :func:`check_not_patched` refuses a second
patch with :class:`AlreadyPatchedError`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from vlprune.handle import PatchHandle

# model -> weak reference to its handle: the model's hooks keep the handle alive, and neither
# reference keeps a dropped model alive.
_PATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[PatchHandle]] = (
    weakref.WeakKeyDictionary()
)


def registered(model: nn.Module) -> PatchHandle | None:
    """The active handle of ``model`` (None if it is not patched)."""
    ref = _PATCHED.get(model)
    handle = ref() if ref is not None else None
    return handle if handle is not None and handle.active else None


def register(handle: PatchHandle) -> None:
    """Make ``handle`` the one of its model."""
    _PATCHED[handle.model] = weakref.ref(handle)


class AlreadyPatchedError(RuntimeError):
    """Raised when patching a model that vlprune already patched."""


def check_not_patched(model: nn.Module) -> None:
    """:class:`AlreadyPatchedError` if ``model`` has an active patch (every ``patch`` path runs
    this check)."""
    existing = registered(model)
    if existing is not None:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched ({existing!r}); call "
            "vlprune.unpatch(model) (or .unpatch() on vlprune.get_handle(model)) first"
        )
