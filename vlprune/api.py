"""The one entry point: ``patch(model, method, budget=...)`` → :class:`PatchHandle`;
``get_handle`` / ``unpatch`` find and remove the patch of a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlprune.adapters import get_adapter
from vlprune.budget import Budget
from vlprune.handle import PatchHandle
from vlprune.hooks.positions import POSITIONS
from vlprune.patched import AlreadyPatchedError, check_not_patched, register, registered
from vlprune.registry import build_method, get_method, list_methods
from vlprune.stats import PruneStats

__all__ = [
    "AlreadyPatchedError",
    "PatchHandle",
    "PruneStats",
    "available_methods",
    "get_handle",
    "patch",
    "unpatch",
]


def patch(
    model: nn.Module,
    method: str,
    *,
    budget: int | None = None,
    ratio: float | None = None,
    positions: str = "original",
    **options: Any,
) -> PatchHandle:
    """Prune visual tokens of ``model`` with ``method``; returns a :class:`PatchHandle`.

    Exactly one of ``budget`` (visual tokens kept per unit of the method's scope: per image for
    most methods; a budget larger than an image keeps all of it) or ``ratio`` (kept fraction in
    (0, 1]); Python or NumPy scalars. ``positions``: ``"original"`` (kept tokens keep their
    RoPE positions) or ``"renumber"`` (the kept tokens renumbered contiguously after every cut,
    later tokens following them: what most official implementations on LLaVA do; 1-D RoPE
    models only). ``options`` are the method's own keyword options, each with its default,
    allowed values and meaning in ``available_methods()``, ``vlprune methods`` and the method
    class's ``help()``. Everything is validated before any hook is installed or any compute
    runs: bad values (NaN and ±inf included) raise ``ValueError`` naming the parameter, an
    unsupported model ``TypeError``, an already patched model :class:`AlreadyPatchedError`, a
    compiled model ``RuntimeError`` (compiled code would ignore the hooks: patch first, then
    compile). A timm ``VisionTransformer`` is patched by :func:`vlprune.timm.patch_timm`
    (option ``cut_block``; ``positions`` must stay ``"original"``: a ViT has no RoPE).

    The hooks keep the handle alive: dropping it does not unpatch the model
    (:func:`get_handle` gives it back, :func:`unpatch` removes it).
    """
    from vlprune.timm import is_timm_model, patch_timm  # timm ViTs have their own hooks

    if is_timm_model(model):
        if positions != "original":
            raise ValueError(f"`positions`={positions!r} does not apply to a timm ViT (no RoPE)")
        return patch_timm(model, method, budget=budget, ratio=ratio, **options)
    budget_ = Budget(tokens=budget, ratio=ratio)
    get_method(method)
    if positions not in POSITIONS:
        raise ValueError(f"`positions` must be one of {', '.join(POSITIONS)}, got {positions!r}")
    check_not_compiled(model)
    adapter = get_adapter(model)
    if positions == "renumber" and adapter.rope != "1d":
        raise ValueError(
            "`positions='renumber'` renumbers 1-D RoPE positions (the LLaVA families' LLaMA / "
            f"Vicuna / Qwen2 language models); a {adapter.family} model has 3-D M-RoPE "
            "positions, which vlprune keeps (as the official Qwen code of HiPrune and MMTok "
            "does): use positions='original'"
        )
    method_ = build_method(method, options)
    method_.check_model(adapter)
    check_not_patched(model)
    handle = PatchHandle(model, adapter, method_, budget_, positions)
    handle._install()
    register(handle)
    return handle


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active :class:`PatchHandle` of ``model``, or None if vlprune has not patched it."""
    return registered(model)


def unpatch(model: nn.Module) -> bool:
    """Remove vlprune's patch from ``model`` (whoever holds the handle); True if it was patched."""
    handle = get_handle(model)
    if handle is None:
        return False
    handle.unpatch()
    return True


def check_not_compiled(model: nn.Module) -> None:
    """``RuntimeError`` for a model compiled before patching: torch.compile does not guard on
    module hooks, so code compiled earlier would silently run without vlprune's (every
    ``patch`` path runs this check)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise RuntimeError(
            "vlprune.patch got a torch.compile wrapper: patch the model first, then compile it "
            "(handle = vlprune.patch(model, ...); model = torch.compile(model))"
        )
    compiled = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if getattr(module, "_compiled_call_impl", None) is not None
    ]
    if compiled:
        raise RuntimeError(
            f"{type(model).__name__} was compiled ({', '.join(compiled[:3])}) before "
            "vlprune.patch: compiled code ignores hooks added later, so nothing would be pruned. "
            "Patch first, then compile (vlprune.patch(model, ...); model.compile())"
        )


def available_methods() -> list[dict[str, Any]]:
    """Registered methods with their stage, budget scope, supported families, citations and
    keyword options (per option: default, type, allowed values and meaning), JSON-ready."""
    rows = []
    for name in list_methods():
        cls = get_method(name)
        rows.append({
            "name": name,
            "stage": cls.stage,
            "scope": cls.scope,
            "families": list(cls.families) if cls.families else "all",
            "paper": cls.paper,
            "repo": cls.repo,
            "options": {opt: option.describe() for opt, option in cls.options.items()},
        })
    return rows
