"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and the kernel modules that decorate with
@triton.jit) are imported, hence at the top of this conftest; torch itself does not import triton.
On a CUDA machine the kernels compile for real and the `gpu`-marked tests run at real shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
