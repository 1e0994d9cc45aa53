"""The probe base class, a module-input probe and a group of hook handles.

Every probe keeps what it captured per thread (a patched model may run forwards from several
threads at once) and only references the tensors of the call (no copy, no compute).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.state import PatchPart, ThreadLocal, eager_hook


class Probe(PatchPart):
    """Base class: ``install()`` registers the hook(s), ``clear()`` drops what was captured.

    ``vision``: the probe reads the image encoder (or what it produced), so it only means
    something for a prefill whose images were encoded in the same call.
    """

    vision: ClassVar[bool] = False

    def install(self) -> RemovableHandle | HandleGroup:
        """Register the hook(s); the caller keeps the handle."""
        raise NotImplementedError

    def clear(self) -> None:
        """Drop the references to the last call's inputs."""
        raise NotImplementedError


class ModuleInputProbe(Probe):
    """Remembers the first positional (or ``hidden_states``) input of a module in each call,
    e.g. the projector's input: the vision features before projection (``vision=True``)."""

    value = ThreadLocal()

    def __init__(self, module: nn.Module, *, vision: bool = False) -> None:
        self.module = module
        self.vision = vision

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.module.register_forward_pre_hook(self._remember, with_kwargs=True)

    @eager_hook
    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = args[0] if args else next(iter(kwargs.values()))

    def clear(self) -> None:
        """Drop the reference."""
        self.value = None


class HandleGroup(PatchPart):
    """Several hook handles of one probe, removed together."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
