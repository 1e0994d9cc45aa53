"""Method registry: ``@register_method("name")`` on the class, looked up by that name everywhere."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vlprune.methods.base import Method

M = TypeVar("M", bound="type[Method]")

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`~vlprune.methods.base.Method` under ``name``."""

    def decorator(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            owner = _METHODS[name].__qualname__
            raise ValueError(f"method {name!r} is already registered by {owner}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def list_methods(*, include_internal: bool = False) -> list[str]:
    """Registered method names, sorted; internal test helpers (``fixed``) only when asked."""
    return sorted(n for n, c in _METHODS.items() if include_internal or not c.internal)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ``ValueError`` listing the names otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(
            f"unknown `method` {name!r}; available: "
            f"{', '.join(list_methods(include_internal=True))}"
        )
    return _METHODS[name]


def method_options(cls: type[Method]) -> dict[str, Any]:
    """Keyword options a method accepts, with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_method(name: str, options: dict[str, Any]) -> Method:
    """Instantiate method ``name`` with ``options``; unknown options raise ``ValueError``."""
    cls = get_method(name)
    allowed = method_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    return cls(**options)
