"""Loading for the ``vlprune`` lmms-eval model: family, processor, and the model arguments
checked before anything loads."""

from __future__ import annotations

import argparse
import json
from typing import Any

from transformers import AutoConfig

import vlprune  # noqa: F401  (registers the methods)
from vlprune.budget import Budget
from vlprune.cli_args import attn_implementation as attn_implementation_arg
from vlprune.cli_args import checkpoint_source, torch_device
from vlprune.eval.processors import (
    IMAGES_ONLY_PROCESSORS,
    LlavaOnevisionProcessorImagesOnly,
    Qwen2_5_VLProcessorImagesOnly,
    Qwen2VLProcessorImagesOnly,
    Qwen3VLProcessorImagesOnly,
    load_processor,
)
from vlprune.hooks.positions import POSITIONS
from vlprune.options import CustomOption, IntOption, Option
from vlprune.registry import get_method, list_methods

__all__ = [
    "IMAGES_ONLY_PROCESSORS",
    "LOADING_ARGS",
    "MODEL_CLASSES",
    "LlavaOnevisionProcessorImagesOnly",
    "Qwen2VLProcessorImagesOnly",
    "Qwen2_5_VLProcessorImagesOnly",
    "Qwen3VLProcessorImagesOnly",
    "check_model_args",
    "load_processor",
    "model_family",
]

MODEL_CLASSES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}
"""``config.model_type`` → model class, for the families vlprune supports."""


def model_family(pretrained: str, **kwargs: Any) -> str:
    """The checkpoint's family (``config.model_type``); ``ValueError`` if vlprune lacks it."""
    model_type = AutoConfig.from_pretrained(pretrained, **kwargs).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{pretrained!r} is a {model_type!r} model; the vlprune lmms-eval model supports "
            f"{', '.join(MODEL_CLASSES)}"
        )
    return model_type


LOADING_ARGS = ("revision", "chat_template", "stats_path", "max_batch_size")
"""``--model_args`` keys of the vlprune model that are neither a method option nor checked
here."""

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _coerce(option: Option, value: Any) -> Any:
    """A ``--model_args`` value as lmms-eval parsed it, read the way ``option`` means it:
    ``-2`` arrives as ``-2.0`` (lmms-eval reads only digit strings as ints), ``None`` as a
    string, a list (``layers=[7,9,12]``) as its text."""
    if isinstance(value, str) and value.lower() in ("none", "null") and option.none:
        return None
    if isinstance(option, IntOption) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(option, CustomOption) and isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def check_model_args(
    pretrained: str | None = None,
    method: str = "none",
    budget: int | None = None,
    ratio: float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    **rest: Any,
) -> dict[str, Any]:
    """Check the vlprune model's ``--model_args`` before anything is loaded; returns the method
    options, read as each option means them (see :func:`_coerce`) and validated.

    ``ValueError`` naming the argument: no ``pretrained``, or one that is neither a local
    checkpoint folder nor a hub id; an unknown method; not exactly one of ``budget`` /
    ``ratio`` for a method; options with ``method=none``; bad options; ``batch_size`` not an
    int ≥ 1 (``auto`` is not supported); an unknown ``dtype``; an unsupported or missing
    attention backend; a device this machine lacks.
    """
    if pretrained is None:
        raise ValueError("`pretrained` is required: a local checkpoint folder or a hub id")
    checkpoint_source(str(pretrained))
    options = {k: v for k, v in rest.items() if k not in LOADING_ARGS}
    positions = options.pop("positions", None)
    if positions is not None and positions not in POSITIONS:
        raise ValueError(f"`positions` must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be an int ≥ 1 (no 'auto'), got {batch_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for check, value, name in ((attn_implementation_arg, attn_implementation,
                                "attn_implementation"), (torch_device, device, "device")):
        if value is not None:
            try:
                check(str(value))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"`{name}`: {err}") from None
    if method == "none":
        if options or positions is not None:
            extra = sorted(options) + (["positions"] if positions is not None else [])
            raise ValueError(f"method=none takes no method options, got {extra}")
        return {}
    cls = get_method(method)
    if method not in list_methods():
        raise ValueError(f"unknown `method` {method!r}; available: {', '.join(list_methods())}")
    Budget(tokens=budget, ratio=ratio)
    options = {k: _coerce(cls.options[k], v) if k in cls.options else v
               for k, v in options.items()}
    cls(**options)
    return options if positions is None else {**options, "positions": positions}
