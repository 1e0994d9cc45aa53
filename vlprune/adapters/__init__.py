"""Model-family adapters: :func:`get_adapter` picks the one that describes a loaded model."""

from __future__ import annotations

from torch import nn

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.adapters.llava import LlavaAdapter
from vlprune.adapters.llava_next import LlavaNextAdapter
from vlprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vlprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from vlprune.adapters.qwen2_vl import Qwen2VLAdapter
from vlprune.adapters.qwen3_5 import Qwen3_5Adapter
from vlprune.adapters.qwen3_vl import Qwen3VLAdapter
from vlprune.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    Qwen3VLMoeAdapter,
    LlavaOnevisionAdapter,
    Qwen3_5Adapter,
)


def supported_classes() -> list[str]:
    """Names of the model classes vlprune can patch."""
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; ``TypeError`` naming the supported classes otherwise."""
    for cls in type(model).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.model_classes:
                return adapter(model)
    raise TypeError(
        f"vlprune cannot patch {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_classes())}"
    )


__all__ = ["ADAPTERS", "Adapter", "ImageLayout", "get_adapter", "supported_classes"]
