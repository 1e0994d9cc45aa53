"""Run the Triton kernel under the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates the kernel, so it is set here, before
any test imports ``vlprune.kernels.triton_topk``. With CUDA the compiled kernel is tested instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
