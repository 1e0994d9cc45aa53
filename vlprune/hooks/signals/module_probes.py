"""The probe base class, a module-input probe, the kept outputs of an attention's projections
and a group of hook handles.

Every probe keeps what it captured per thread (a patched model may run forwards from several
threads at once) and only references the tensors of the call (no copy, no compute).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.state import PatchPart, ThreadLocal, eager_hook


class Probe(PatchPart):
    """Base class: ``install()`` registers the hook(s), ``clear()`` drops what was captured.

    ``vision``: the probe reads the image encoder (or what it produced), so it only means
    something for a prefill whose images were encoded in the same call. ``work``: names of the
    methods that compute inside the forward's hooks rather than when a method asks (the
    profiler times them as part of the method's selection).
    """

    vision: ClassVar[bool] = False
    work: ClassVar[tuple[str, ...]] = ()

    def install(self) -> RemovableHandle | HandleGroup:
        """Register the hook(s); the caller keeps the handle."""
        raise NotImplementedError

    def clear(self) -> None:
        """Drop the references to the last call's inputs."""
        raise NotImplementedError


class WrapperProbe(Probe):
    """A probe computed from another probe's capture: ``install`` / ``clear`` are delegated to
    the wrapped ``probe``."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def install(self) -> RemovableHandle | HandleGroup:
        """Install the wrapped probe."""
        return self.probe.install()

    def clear(self) -> None:
        """Clear the wrapped probe."""
        self.probe.clear()


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


class ProjectionOutputs(PatchPart):
    """The outputs of an attention module's projections (``q_proj``, ``qkv``, ...) in its own
    calls, so a probe reads the layer's q / k / v instead of projecting them again.

    Only calls made while the module runs (between its pre-hook and its forward hook) count:
    a probe that projects rows itself later (e.g. where none were kept: a compiled model does
    not run hooks on its projections) never replaces them.
    """

    outputs = ThreadLocal()
    _running = ThreadLocal(False)

    def __init__(self, attention: nn.Module, names: Sequence[str]) -> None:
        self.attention = attention
        self.names = tuple(names)

    def install(self) -> HandleGroup:
        """Register the module's pre- and forward hooks and one hook per projection."""
        return HandleGroup([
            self.attention.register_forward_pre_hook(self._start),
            self.attention.register_forward_hook(self._stop, always_call=True),
            *(self.keep(name) for name in self.names),
        ])

    def keep(self, name: str) -> RemovableHandle:
        """Register a hook keeping the output of projection ``name`` too."""
        return getattr(self.attention, name).register_forward_hook(partial(self._keep, name))

    @eager_hook
    def _start(self, module: nn.Module, args: tuple) -> None:
        self.outputs = {}
        self._running = True

    @eager_hook
    def _stop(self, module: nn.Module, args: tuple, output: object) -> None:
        self._running = False

    @eager_hook
    def _keep(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._running:
            self.outputs[name] = output

    def get(self, name: str) -> torch.Tensor | None:
        """Output of projection ``name`` in the module's last call (None if none was kept)."""
        return (self.outputs or {}).get(name)

    def clear(self) -> None:
        """Drop the references."""
        self.outputs = None
