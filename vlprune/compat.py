"""What differs between the supported transformers releases (5.17 and later), in one place.

transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to
``cache`` (the old name stays a deprecated alias of the model's ``forward`` for a while); the
decoder layers and the language model receive only the name of their release. Everything in
vlprune that reads or passes a cache goes through this module. 5.24 also added precomputed
image features (``mm_encoder_outputs``), which ``generate`` passes at every step instead of the
pixels.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.llava.modeling_llava import LlavaModel

__all__ = ["CACHE_KWARG", "PRECOMPUTED_FEATURES", "call_cache", "layer_cache", "output_cache",
           "passed_cache"]

CACHE_KWARG = ("cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters
               else "past_key_values")
"""The keyword a decoder layer / language model takes its KV cache under in this release."""

PRECOMPUTED_FEATURES = "mm_encoder_outputs" in inspect.signature(LlavaModel.forward).parameters
"""Whether the models of this release take precomputed image features (``mm_encoder_outputs``)."""


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a module's keyword arguments (None when absent)."""
    return kwargs.get(CACHE_KWARG)


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a user passed to a model's ``forward`` or ``generate`` (either name: 5.24
    still accepts ``past_key_values``; None when absent)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def call_cache(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass a cache to a model or module call of this release."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``.cache`` or, before 5.24, ``.past_key_values``; None
    when the output carries none)."""
    return getattr(output, CACHE_KWARG, None)
