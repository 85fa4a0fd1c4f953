"""The gated MLP: gate/up in one matmul, act(gate) * up fused on CUDA; act silu (SwiGLU) or
gelu_pytorch_tanh (GeGLU: Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.models.layers.fused import use_fused
from sglite.runtime.models.layers.linear import MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported MLP activation {act!r} (silu, gelu_pytorch_tanh)")
        self.act = act
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.early_act = False  # the activation lets down_proj launch early (pdl.py; Gemma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = self.act == "gelu_pytorch_tanh"
        if use_fused(x):
            from sglite.kernels.activation import gelu_tanh_and_mul, silu_and_mul

            fn = gelu_tanh_and_mul if gelu else silu_and_mul
            return self.down_proj(fn(self.gate_up_proj.fused(x), early=self.early_act))
        gate, up = self.gate_up_proj(x)
        return self.down_proj((F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up)
