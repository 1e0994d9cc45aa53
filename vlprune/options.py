"""Method options, declared once: default, type, allowed values and a one-line meaning.

A method class lists its keyword options in ``options`` (name → :class:`Option`). That one
declaration validates and normalises what ``vlprune.patch(model, name, **options)`` passes
(before any hook or compute: :func:`check_options`), gives the class its signature and the
options section of ``help()`` (:func:`describe_options`), and feeds
``vlprune.available_methods()`` and ``vlprune methods``.

Numbers are accepted as Python or NumPy scalars (``np.int64``, ``np.float32``) and stored as
plain ``int`` / ``float``; floats must be finite; ``bool`` is never an int.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "REQUIRED",
    "BoolOption",
    "ChoiceOption",
    "CustomOption",
    "FloatOption",
    "IntOption",
    "Option",
    "as_float",
    "as_int",
    "check_options",
    "declare",
    "describe_options",
    "options_signature",
    "seed_option",
]

_INVALID = object()


class _Required:
    """The ``default`` of an option that must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def as_int(value: Any) -> int | None:
    """``value`` as a plain ``int`` if it is an integer scalar (Python or NumPy, not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_float(value: Any) -> float | None:
    """``value`` as a finite plain ``float`` if it is a real scalar (Python or NumPy, not a
    bool); None for anything else, NaN and ±inf included."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Option:
    """One keyword option: its ``default`` (:data:`REQUIRED`: must be given) and a one-line
    ``help``; subclasses add the type and range. ``none``: None is allowed too (``help`` says
    what it means). ``domain`` replaces the generated description of the allowed values."""

    default: Any
    help: str
    none: bool = field(default=False, kw_only=True)
    domain: str | None = field(default=None, kw_only=True)

    type_name: ClassVar[str] = "any"
    annotation: ClassVar[Any] = Any

    def check(self, name: str, value: Any) -> Any:
        """``value`` as a plain Python value; ``ValueError`` naming ``name`` if not allowed."""
        if value is None and self.none:
            return None
        converted = _INVALID if value is None else self.convert(name, value)
        if converted is _INVALID:
            raise ValueError(f"`{name}` must be {self.allowed()}, got {value!r}")
        return converted

    def convert(self, name: str, value: Any) -> Any:
        """The normalised value, or ``_INVALID``."""
        return value

    def values(self) -> str:
        """The allowed values, in words (without None)."""
        return "any value"

    def allowed(self) -> str:
        """The allowed values, in words (None included where allowed)."""
        text = self.domain or self.values()
        return f"{text}, or None" if self.none else text

    def describe(self) -> dict[str, Any]:
        """``{"default", "type", "allowed", "help"}`` (JSON-serialisable)."""
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        if self.default is REQUIRED:
            default = "required"
        return {"default": default, "type": self.type_text(), "allowed": self.allowed(),
                "help": self.help}

    def type_text(self) -> str:
        """The value's type, in one word."""
        return self.type_name


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '≥'} {low:g}"
    if low is None:
        return f" {'<' if high_open else '≤'} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


@dataclass(frozen=True)
class IntOption(Option):
    """An int (NumPy integers accepted) in ``[minimum, maximum]`` (either end may be open)."""

    minimum: int | None = None
    maximum: int | None = None

    type_name: ClassVar[str] = "int"
    annotation: ClassVar[Any] = int

    def convert(self, name: str, value: Any) -> Any:
        number = as_int(value)
        if number is None:
            return _INVALID
        if self.minimum is not None and number < self.minimum:
            return _INVALID
        if self.maximum is not None and number > self.maximum:
            return _INVALID
        return number

    def values(self) -> str:
        return "an int" + _interval(self.minimum, self.maximum, False, False)


@dataclass(frozen=True)
class FloatOption(Option):
    """A finite number (int, float or NumPy scalar; stored as float) between ``low`` and
    ``high``, each end closed unless ``low_open`` / ``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    type_name: ClassVar[str] = "float"
    annotation: ClassVar[Any] = float

    def convert(self, name: str, value: Any) -> Any:
        number = as_float(value)
        if number is None:
            return _INVALID
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return _INVALID
        if self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        ):
            return _INVALID
        return number

    def values(self) -> str:
        return "a finite number" + _interval(self.low, self.high, self.low_open, self.high_open)


@dataclass(frozen=True)
class BoolOption(Option):
    """``True`` or ``False`` (``numpy.bool_`` accepted); ints are not bools here."""

    type_name: ClassVar[str] = "bool"
    annotation: ClassVar[Any] = bool

    def convert(self, name: str, value: Any) -> Any:
        return bool(value) if isinstance(value, (bool, np.bool_)) else _INVALID

    def values(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class ChoiceOption(Option):
    """One of the strings ``choices``."""

    choices: tuple[str, ...] = field(kw_only=True)

    type_name: ClassVar[str] = "str"
    annotation: ClassVar[Any] = str

    def convert(self, name: str, value: Any) -> Any:
        return value if isinstance(value, str) and value in self.choices else _INVALID

    def values(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices))


@dataclass(frozen=True)
class CustomOption(Option):
    """A value checked by ``check_value(value) -> normalised value``, which raises
    ``ValueError`` naming the option; ``domain`` describes the allowed values, ``kind`` the
    type."""

    check_value: Callable[[Any], Any] = field(kw_only=True)
    kind: str = field(default="sequence", kw_only=True)

    def type_text(self) -> str:
        return self.kind

    def convert(self, name: str, value: Any) -> Any:
        return self.check_value(value)


def declare(**options: Option) -> Mapping[str, Option]:
    """A method's ``options`` (read-only), in the order given: ``options = declare(seed=...)``."""
    return MappingProxyType(options)


def seed_option(help: str) -> IntOption:
    """A random seed: any int ``torch.manual_seed`` accepts."""
    return IntOption(0, help, minimum=-(2**63), maximum=2**64 - 1,
                     domain="an int in [-2**63, 2**64 - 1] (torch.manual_seed's range)")


def check_options(method: str, declared: Mapping[str, Option],
                  given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option of ``method``: its checked ``given`` value or its default.

    ``ValueError`` for an unknown name (listing the allowed ones) or a value outside an option's
    allowed values (naming the option).
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"allowed: {', '.join(declared) or '(none)'}"
        )
    missing = [n for n, o in declared.items() if o.default is REQUIRED and n not in given]
    if missing:
        raise ValueError(f"method {method!r} needs option(s) {', '.join(map(repr, missing))}")
    return {
        name: option.check(name, given[name]) if name in given else option.default
        for name, option in declared.items()
    }


def options_signature(declared: Mapping[str, Option]) -> inspect.Signature:
    """Keyword-only signature ``(*, name: type = default, ...)`` of the declared options."""
    params = []
    for name, option in declared.items():
        annotation = option.annotation
        if option.none and annotation is not Any:
            annotation = annotation | None
        default = inspect.Parameter.empty if option.default is REQUIRED else option.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=annotation))
    return inspect.Signature(params)


def describe_options(declared: Mapping[str, Option]) -> str:
    """Plain-text lines ``name = default (allowed values): meaning`` (empty without options)."""
    return "\n".join(
        f"{name} = {option.default!r} ({option.allowed()}): {option.help}"
        for name, option in declared.items()
    )
