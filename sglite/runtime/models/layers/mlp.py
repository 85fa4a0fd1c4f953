"""The gated MLP (SwiGLU): gate/up in one matmul, silu(gate) * up fused on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.models.layers.fused import use_fused
from sglite.runtime.models.layers.linear import MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from sglite.kernels.activation import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj.fused(x)))
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)
