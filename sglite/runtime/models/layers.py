"""Building blocks of the Llama family, numerically matched to transformers' implementations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then back to the input dtype before the weight (as transformers does)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate_half) rope; cos/sin computed per forward from the positions."""

    def __init__(self, head_dim: int, *, theta: float, scaling: dict | None = None):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        inv_freq = 1.0 / (theta**exponents)
        self.inv_freq_cpu = _scale_inv_freq(inv_freq, scaling)  # plain attr: survives meta init
        self._inv_freq: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [num_tokens] -> cos, sin [num_tokens, 1, head_dim] in dtype."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = self.inv_freq_cpu.to(positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    # Llama 3.1: long wavelengths are slowed by `factor`, short kept, the band between blended
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


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
        return list(F.linear(x, self.weight, self.bias).split(list(self.shard_sizes.values()), -1))

    def load_shard(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        """kind: "weight" or "bias"."""
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        param = getattr(self, kind)
        if param is None or tuple(tensor.shape[:1]) != (size,):
            raise ValueError(f"cannot load {shard}.{kind} of shape {tuple(tensor.shape)}")
        param.data[start : start + size].copy_(tensor)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)
