"""Where the hooks keep per-call state: private to each thread, or tied to one KV cache.

A patched model may run forwards from several threads at once, and a pruned KV cache may be
continued long after other calls ran (multi-turn chat). So nothing a call decides lives on an
object all calls share:

- :class:`ThreadLocal` attributes hold what one forward hands from hook to hook, and the last
  prefill's statistics, separately for every thread;
- :class:`CacheRecords` keeps what a prefill decided on the KV cache it filled, so every later
  forward on that cache decodes consistently, whatever ran in between;
- :func:`mark_pruned` makes a cache whose prompt rows were dropped before the language model
  report its *logical* length (the unpruned prompt plus what followed) to ``generate`` and the
  model, which count positions and slice re-fed inputs with it, while attention masks keep
  using the rows it really holds.

Every object a patch hangs on a model derives from :class:`PatchPart`: ``copy.deepcopy(model)``
copies the patch with the model (the copy gets its own, independent state), and pickling a
patched model (``torch.save(model)``) fails with :data:`PICKLE_ERROR`. Hooks are
:func:`eager_hook`: a model compiled after patching runs them eagerly.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable
from types import MethodType
from typing import Any, TypeVar

import torch

PICKLE_ERROR = (
    "a model patched by vlprune cannot be pickled or saved whole (torch.save(model), "
    "pickle.dumps(model)): call vlprune.unpatch(model) first, or save its weights with "
    "model.state_dict() / model.save_pretrained(...)"
)


F = TypeVar("F", bound=Callable[..., Any])


def eager_hook(fn: F) -> F:
    """Mark a hook to run eagerly under ``torch.compile``: compiled code calls it as it is
    (its Python control flow, per-thread state and the methods it calls are never traced into
    a graph). Not for code that calls back into the model (shadows of model methods)."""
    return torch.compiler.disable(fn)


class PatchPart:
    """Base of the objects a patch hangs on a model (hooks, probes, the handle).

    ``copy.deepcopy`` copies the instance attribute by attribute (inside a model's deep copy,
    references to the model resolve to the copy); pickling raises ``TypeError(PICKLE_ERROR)``.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchPart:
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_ERROR)


class _Threads(threading.local):
    """The per-thread storage behind :class:`ThreadLocal`; a deep copy starts empty."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Threads:
        return _Threads()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_ERROR)


class ThreadLocal:
    """Descriptor: an instance attribute with one value per thread (``default`` until set).

    ``default`` must be immutable (it is shared by every thread).
    """

    def __init__(self, default: Any = None) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(_threads(obj), self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(_threads(obj), self.name, value)


def _threads(obj: Any) -> _Threads:
    threads = obj.__dict__.get("_threads")
    if threads is None:
        threads = obj.__dict__.setdefault("_threads", _Threads())
    return threads


class CacheRecords(PatchPart):
    """What each prefill of one cut decided, stored on the KV cache it filled.

    The record travels with the cache object (a deep-copied cache keeps it); the key tells the
    patches apart (another patch's records are not this one's).
    """

    def __init__(self, kind: str) -> None:
        self.key = f"vlprune-{kind}-{next(_KEYS)}"

    def get(self, cache: Any) -> Any:
        """The record of ``cache`` (None if no prefill of this patch filled it)."""
        return cache.__dict__.get(_RECORDS, {}).get(self.key)

    def set(self, cache: Any, record: Any) -> None:
        """Remember ``record`` for ``cache``."""
        cache.__dict__.setdefault(_RECORDS, {})[self.key] = record


_RECORDS = "vlprune_records"
_KEYS = itertools.count()


def physical_length(cache: Any, layer: int = 0) -> int:
    """Rows the cache really holds at ``layer`` (its class's ``get_seq_length``)."""
    return type(cache).get_seq_length(cache, layer)


def dropped_rows(cache: Any) -> int:
    """Prompt rows a vision-side cut dropped before ``cache``'s prefill (0 if none)."""
    return cache.__dict__.get("vlprune_dropped", 0)


def mark_pruned(cache: Any, dropped: int) -> None:
    """After a prefill that dropped ``dropped`` prompt rows before the language model, make
    ``cache`` report its logical length at layer 0 (``get_seq_length``: rows held + dropped) and
    keep the physical one where masks are built (``get_query_offset``)."""
    cache.__dict__["vlprune_dropped"] = dropped
    if dropped:
        cache.__dict__["get_seq_length"] = MethodType(_logical_seq_length, cache)
        cache.__dict__["get_query_offset"] = MethodType(_physical_query_offset, cache)
    else:
        cache.__dict__.pop("get_seq_length", None)
        cache.__dict__.pop("get_query_offset", None)


def _logical_seq_length(cache: Any, layer_idx: int = 0) -> Any:
    length = type(cache).get_seq_length(cache, layer_idx)
    if layer_idx == 0 and length > 0:
        return length + dropped_rows(cache)
    return length


def _physical_query_offset(cache: Any, layer_idx: int = 0) -> Any:
    offset = type(cache).get_query_offset(cache, layer_idx)
    if layer_idx == 0 and type(cache).get_seq_length(cache, 0) > 0:
        return offset - dropped_rows(cache)
    return offset
