"""Fixtures of the timm tests. timm is imported lazily: the test modules skip when it is
absent (the main environment; ``scripts/setup_timm.sh`` makes ``.venv-timm``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.timm_vit.timm_vits import CONFIGS, IMAGE, build_vit


@pytest.fixture
def make_vit() -> Callable[..., torch.nn.Module]:
    """``make_vit(config_name, **overrides)`` → a tiny ViT of ``CONFIGS[config_name]``."""

    def make(name: str = "cls-token", **overrides: Any) -> torch.nn.Module:
        return build_vit(**{**CONFIGS[name], **overrides})

    return make


@pytest.fixture
def images() -> torch.Tensor:
    """Three different 64x64 images."""
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
