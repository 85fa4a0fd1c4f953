"""Linear layers as checkpoints name them: fused projections loaded shard by shard, and the hook
a quantization method plugs into (sglite.runtime.models.quant).

A layer's `quant_method` is None (plain F.linear on its weight) or an object whose
`apply(layer, x)` computes the layer from whatever it stored on it (FP8: an fp8 weight and a
per-channel `weight_scale`). The model code calls the layers as before, so the fused norm,
rotary and activation kernels around them and the CUDA graphs that capture them are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] through the layer's quant method, or F.linear without one; a
    layer whose model set `one_row_gemv` on it takes sglite.kernels.gemv for one-row CUDA inputs
    (batch-1 decode; chained early launch, pdl.py)."""
    method = getattr(layer, "quant_method", None)
    if method is None:
        if getattr(layer, "one_row_gemv", False):
            from sglite.kernels import gemv

            if gemv.use_gemv(x, layer.weight, layer.bias):
                return gemv.gemv(x, layer.weight, early=True)
        return F.linear(x, layer.weight, layer.bias)
    return method.apply(layer, x)


class MergedLinear(nn.Module):
    """One matmul for several checkpoint projections (q/k/v, gate/up), loaded shard by shard."""

    def __init__(self, in_features: int, shards: dict[str, int], *, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = dict(shards)
        self.shard_offsets = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = offset
            offset += size
        self.out_features = offset
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None
        self.quant_method = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shards as views of one output: [T, size] each."""
        return list(self.fused(x).split(list(self.shard_sizes.values()), -1))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The unsplit output [T, sum of shard sizes]."""
        return linear_forward(self, x)

    def load_shard(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        """kind: "weight" or "bias"."""
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        param = getattr(self, kind)
        if param is None or tuple(tensor.shape[:1]) != (size,):
            raise ValueError(f"cannot load {shard}.{kind} of shape {tuple(tensor.shape)}")
        param.data[start : start + size].copy_(tensor)


class QuantLinear(nn.Module):
    """An nn.Linear with the quant hook: what a quant method swaps in for a model's nn.Linear
    (same parameter names, so checkpoints load into it unchanged)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.quant_method = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant_method}"
