"""When the layers run fused Triton kernels instead of their torch code.

On CUDA the norms, the rotary embedding and the gated activation run as fused Triton kernels
(sglite.kernels.norm/rotary/activation): a batch-1 decode step is launch-bound, and the torch ops
cost ~19 small kernels per layer (pow/mean/rsqrt/mul/cast, chunk/cat/mul/add, silu, mul, adds).
Elsewhere (the CPU executor) the plain torch code runs. SGLITE_FUSED_KERNELS=0 keeps the torch
code on CUDA too (the before/after benchmark; read at import, or set `layers.fused.FUSED_KERNELS`).
"""

from __future__ import annotations

import os

import torch

FUSED_KERNELS = os.environ.get("SGLITE_FUSED_KERNELS", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    return FUSED_KERNELS and x.is_cuda
