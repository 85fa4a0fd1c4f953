"""Linear layers as checkpoints name them: fused projections loaded shard by shard.
(Parallel and quantized variants belong here.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MergedLinear(nn.Module):
    """One matmul for several checkpoint projections (q/k/v, gate/up), loaded shard by shard."""

    def __init__(self, in_features: int, shards: dict[str, int], *, bias: bool = False):
        super().__init__()
        self.shard_sizes = dict(shards)
        self.shard_offsets = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = offset
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shards as views of one output: [T, size] each."""
        return list(self.fused(x).split(list(self.shard_sizes.values()), -1))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The unsplit output [T, sum of shard sizes]."""
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        """kind: "weight" or "bias"."""
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        param = getattr(self, kind)
        if param is None or tuple(tensor.shape[:1]) != (size,):
            raise ValueError(f"cannot load {shard}.{kind} of shape {tuple(tensor.shape)}")
        param.data[start : start + size].copy_(tensor)
