"""Top-k token selection for every pruning method: a torch reference and a fused Triton kernel.

Selection rule (identical on every backend, deterministic): order by score descending, ties broken
by lower index first, take the first ``k``. Ineligible entries (``mask`` False) count as ``-inf``
and are picked only when fewer than ``k`` entries are finite, lowest index first. Scores must be
NaN-free (not checked: it would cost a device sync).

Backends: ``"torch"`` (reference) and ``"triton"`` (one fused launch). ``backend=None`` picks
Triton for CUDA tensors when triton is installed, torch otherwise; the environment variable
``VLPRUNE_KERNEL_BACKEND`` (``torch`` / ``triton`` / ``auto``) overrides that automatic choice.
Triton is imported only when the Triton backend is used.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from vlprune.kernels import reference

__all__ = ["BACKENDS", "resolve_backend", "select_and_gather", "select_topk"]

BACKENDS = ("torch", "triton")
ENV_VAR = "VLPRUNE_KERNEL_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=1)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs for ``backend`` (None = auto) on ``device``: "torch" or "triton"."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend == "auto":
            use_triton = device.type == "cuda" and _triton_available()
            return "triton" if use_triton else "torch"
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {source}; allowed: None (auto), {BACKENDS}")
    return backend


def _triton_module() -> ModuleType:
    try:
        from vlprune.kernels import triton_topk
    except ImportError as err:
        raise RuntimeError(
            "backend='triton' needs the `triton` package (pip install 'vlprune[triton]'); "
            "use backend='torch' or backend=None"
        ) from err
    return triton_topk


def _check_scores(scores: Tensor, k: int) -> int:
    """Validate ``scores`` and ``k``; return ``k`` as a Python int."""
    if not isinstance(scores, Tensor) or scores.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`scores` must be a float32/float16/bfloat16 tensor, got {_describe(scores)}"
        )
    if scores.dim() not in (1, 2):
        raise ValueError(f"`scores` must be (B, N) or (N,), got {_describe(scores)}")
    n = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"`k` must be an int with 1 <= k <= N (N={n}), got k={k!r}")
    return int(k)


def _check_mask(scores: Tensor, mask: Tensor | None) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor, got {_describe(mask)}")
    if mask.shape != scores.shape or mask.device != scores.device:
        raise ValueError(
            f"`mask` must match `scores` {tuple(scores.shape)} on {scores.device}, "
            f"got {tuple(mask.shape)} on {mask.device}"
        )


def _check_hidden(scores: Tensor, hidden: Tensor) -> None:
    want = tuple(scores.shape)
    ok = (
        isinstance(hidden, Tensor)
        and hidden.dim() == scores.dim() + 1
        and tuple(hidden.shape[:-1]) == want
        and hidden.device == scores.device
    )
    if not ok:
        raise ValueError(
            f"`hidden` must be {(*want, 'D')} on {scores.device} to match `scores`, "
            f"got {_describe(hidden)}"
        )


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__


def _as_batch(x: Tensor | None, batched: bool) -> Tensor | None:
    return x if x is None or batched else x.unsqueeze(0)


def select_topk(
    scores: Tensor,
    k: int,
    *,
    keep_order: bool = True,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Indices of the ``k`` best entries per row: ``scores`` (B, N) -> int64 (B, k).

    ``keep_order=True`` returns each row's indices ascending (original token order); otherwise in
    selection order (score descending, ties lower index first). ``mask`` (B, N) bool, True =
    eligible. A 1-D ``scores`` (N,) (with a (N,) ``mask``) is one row and gives (k,).
    ``backend``: None (auto), "torch" or "triton" (see the module docstring).
    """
    k = _check_scores(scores, k)
    _check_mask(scores, mask)
    batched = scores.dim() == 2
    scores2, mask2 = _as_batch(scores, batched), _as_batch(mask, batched)
    if resolve_backend(backend, scores.device) == "torch":
        idx = reference.topk_indices(scores2, k, keep_order=keep_order, mask=mask2)
    else:
        idx, _ = _triton_module().topk_triton(scores2, k, mask=mask2)
        if not keep_order:
            idx = reference.selection_order(scores2, idx, mask2)
    return idx if batched else idx.squeeze(0)


def select_and_gather(
    scores: Tensor,
    k: int,
    hidden: Tensor,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Ascending top-k indices (B, k) and the kept rows ``hidden[b, idx[b]]`` (B, k, D).

    ``scores`` (B, N), ``hidden`` (B, N, D), ``mask`` (B, N) bool as in :func:`select_topk`.
    1-D ``scores`` (N,) takes ``hidden`` (N, D) and gives (k,) and (k, D). Rows stay
    differentiable: when ``hidden`` requires grad, the Triton backend selects and torch gathers.
    """
    k = _check_scores(scores, k)
    _check_mask(scores, mask)
    _check_hidden(scores, hidden)
    batched = scores.dim() == 2
    scores2, mask2 = _as_batch(scores, batched), _as_batch(mask, batched)
    hidden2 = _as_batch(hidden, batched)
    if resolve_backend(backend, scores.device) == "torch":
        idx, rows = reference.select_and_gather(scores2, k, hidden2, mask=mask2)
    elif hidden.requires_grad and torch.is_grad_enabled():
        idx, _ = _triton_module().topk_triton(scores2, k, mask=mask2)
        rows = reference.gather_rows(hidden2, idx)
    else:
        idx, rows = _triton_module().topk_triton(scores2, k, mask=mask2, hidden=hidden2)
    return (idx, rows) if batched else (idx.squeeze(0), rows.squeeze(0))
