"""Suite-wide setup.

``TRITON_INTERPRET`` must be set before anything imports triton (transformers and torch may
import it while test modules are collected): without CUDA the Triton kernel then runs under the
interpreter; with CUDA the compiled kernel is tested.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models are latency-bound: one intra-op thread is faster and steadier on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
