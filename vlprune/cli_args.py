"""Argument parsing shared by the ``vlprune`` subcommands: one-line errors, lists, checks.

Every check runs while the arguments are parsed, before any model is built or timed. A bad
argument ends the command with exit code 2 and one line on stderr (``vlprune demo: error: ...``);
:class:`CommandError` is a failure found later (exit code 1, one line, no traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "CommandError",
    "OneLineParser",
    "SplitList",
    "attn_implementation",
    "budget_value",
    "checkpoint_source",
    "int_at_least",
    "method_name",
    "output_dir",
    "run_command",
    "torch_device",
]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
"""Attention backends vlprune supports (``flash_attention_2`` where flash-attn is installed)."""


class CommandError(Exception):
    """A failure after parsing: ``vlprune`` prints ``<command>: <message>`` and exits 1."""


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line: ``<prog>: error: <message> (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class SplitList(argparse.Action):
    """``nargs="+"`` option whose values may also be comma-separated: ``--budgets 64 128``,
    ``--budgets 64,128`` and ``--budgets 64, 128`` are the same list. ``item`` converts (and
    checks) each value; its ``ValueError`` / ``ArgumentTypeError`` becomes the error message."""

    def __init__(self, option_strings: Sequence[str], dest: str,
                 item: Callable[[str], Any] = str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.item = item

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        texts = [part.strip() for value in values for part in str(value).split(",")]
        items = []
        for text in texts:
            if not text:
                continue
            try:
                items.append(self.item(text))
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise argparse.ArgumentError(self, str(err)) from None
        if not items:
            raise argparse.ArgumentError(self, "expected at least one value")
        setattr(namespace, self.dest, items)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Argument type: an int ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int ≥ {minimum}, got {text!r}")
        return value

    return parse


def budget_value(text: str) -> int | float:
    """A budget: ``"64"`` → 64 visual tokens kept (int ≥ 1), ``"0.25"`` → ratio 0.25 (kept
    fraction in (0, 1])."""
    try:
        value: int | float = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    except ValueError:
        value = 0
    if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1):
        return value
    raise argparse.ArgumentTypeError(
        f"a budget is an int ≥ 1 (visual tokens kept) or a fraction in (0, 1] (kept ratio), "
        f"got {text!r}"
    )


def method_name(text: str) -> str:
    """A registered public method (the error lists them)."""
    import vlprune  # noqa: F401  (registers the methods)
    from vlprune.registry import get_method, list_methods

    if text not in list_methods():
        try:
            get_method(text)  # internal names exist but are not offered
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        raise argparse.ArgumentTypeError(
            f"{text!r} is internal; available: {', '.join(list_methods())}")
    return text


def torch_device(text: str) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported (cpu, cuda, cuda:N)")
    return text


def attn_implementation(text: str) -> str:
    """One of :data:`ATTN_IMPLEMENTATIONS`; ``flash_attention_2`` needs flash-attn installed."""
    if text not in ATTN_IMPLEMENTATIONS:
        raise argparse.ArgumentTypeError(
            f"attention {text!r} is not supported; one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if text == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise argparse.ArgumentTypeError(
            "flash_attention_2 needs the flash-attn package (`pip install flash-attn`, CUDA); "
            "use sdpa")
    return text


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def checkpoint_source(text: str) -> str:
    """A local checkpoint folder (with ``config.json``) or a hub id (``org/name``), unchecked
    against the hub; ``ValueError`` otherwise."""
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{text!r} is a folder without a config.json")
        return str(path)
    if path.exists():
        raise ValueError(f"{text!r} is a file, not a checkpoint folder")
    if not _HUB_ID.fullmatch(text):
        raise ValueError(f"{text!r} is neither a local checkpoint folder nor a hub id (org/name)")
    return text


def output_dir(text: str) -> Path:
    """A folder to write into: a path that is not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path


def run_command(name: str, func: Callable[[argparse.Namespace], int | None],
                args: argparse.Namespace) -> int:
    """``func(args)``'s exit code (None = 0); a :class:`CommandError` prints one line on
    stderr and gives 1."""
    try:
        return int(func(args) or 0)
    except CommandError as err:
        print(f"vlprune {name}: {err}", file=sys.stderr)
        return 1
