"""Method registry: ``@register_method("name")`` on the class, looked up by that name everywhere."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vlprune.options import REQUIRED, describe_options, options_signature

if TYPE_CHECKING:
    from vlprune.methods.base import Method

M = TypeVar("M", bound="type[Method]")

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`~vlprune.methods.base.Method` under ``name``.

    The class's ``options`` declarations are checked (each default must be one of its own
    allowed values) and become its signature and the options section of its docstring.
    """

    def decorator(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            owner = _METHODS[name].__qualname__
            raise ValueError(f"method {name!r} is already registered by {owner}")
        for option, declared in cls.options.items():
            if declared.default is not REQUIRED:
                declared.check(option, declared.default)
        cls.name = name
        cls.__signature__ = options_signature(cls.options)  # type: ignore[attr-defined]
        if cls.options:
            lines = textwrap.indent(describe_options(cls.options), "    ")
            cls.__doc__ = f"{(cls.__doc__ or '').rstrip()}\n\n    Options:\n\n{lines}\n"
        _METHODS[name] = cls
        return cls

    return decorator


def list_methods(*, include_internal: bool = False) -> list[str]:
    """Registered method names, sorted; internal test helpers (``fixed``) only when asked."""
    return sorted(n for n, c in _METHODS.items() if include_internal or not c.internal)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ``ValueError`` listing the public methods
    otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown `method` {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name]


def build_method(name: str, options: dict[str, Any]) -> Method:
    """Instantiate method ``name`` with ``options``; an unknown option or a value outside its
    allowed values raises ``ValueError`` naming it."""
    return get_method(name)(**options)
