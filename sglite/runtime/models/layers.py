"""Building blocks of the Llama family, numerically matched to transformers' implementations.

On CUDA the norms, the rotary embedding and the gated activation run as fused Triton kernels
(sglite.kernels.norm/rotary/activation): a batch-1 decode step is launch-bound, and the torch ops
cost ~19 small kernels per layer (pow/mean/rsqrt/mul/cast, chunk/cat/mul/add, silu, mul, adds).
Elsewhere (the CPU executor) the plain torch code runs. SGLITE_FUSED_KERNELS=0 keeps the torch
code on CUDA too (the before/after benchmark; read at import, or set `layers.FUSED_KERNELS`).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

FUSED_KERNELS = os.environ.get("SGLITE_FUSED_KERNELS", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    return FUSED_KERNELS and x.is_cuda


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., dim] -> normed; with a residual: (normed, x + residual), the fused-residual
        pattern of the decoder layer. On CUDA with a residual both are updated in place."""
        if use_fused(x):
            from sglite.kernels.norm import fused_add_rms_norm, rms_norm

            if residual is not None:
                return fused_add_rms_norm(x, residual, self.weight, self.eps)
            rows = x.reshape(-1, x.shape[-1])  # a copy only for strided per-head views (qk_norm)
            return rms_norm(rows, self.weight, self.eps).view(x.shape)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then back to the input dtype before the weight (as transformers does)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate_half) rope; cos/sin computed once per forward from the positions."""

    def __init__(self, head_dim: int, *, theta: float, scaling: dict | None = None):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        inv_freq = 1.0 / (theta**exponents)
        self.inv_freq_cpu = _scale_inv_freq(inv_freq, scaling)  # plain attr: survives meta init
        self._inv_freq: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [num_tokens] -> (cos, sin): fused path fp32 [num_tokens, head_dim / 2];
        torch path [num_tokens, 1, head_dim] in dtype (as transformers rounds them)."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = self.inv_freq_cpu.to(positions.device)
        # int64 * fp32 promotes to fp32 inside the one kernel: the same products as transformers'
        freqs = positions[:, None] * self._inv_freq[None, :]  # [T, D / 2] fp32
        if use_fused(positions):
            return freqs.cos(), freqs.sin()
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_qk(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *,
              v: torch.Tensor | None = None, kv_destination=None):
    """q [T, H, D], k [T, KH, D] or None -> (q, k, stored): rotated, on CUDA in place in one
    launch. kv_destination: (k_buffer, v_buffer, slots) from the attention backend; on CUDA that
    launch also stores the rotated k and v there, and stored says whether it did."""
    if use_fused(q):
        from sglite.kernels.rotary import apply_rotary_qk

        store = kv_destination is not None and k is not None
        dest = dict(zip(("k_buffer", "v_buffer", "loc"), kv_destination)) if store else {}
        apply_rotary_qk(q, k, cos, sin, v=v if store else None, **dest)
        return q, k, store
    return apply_rotary(q, cos, sin), (None if k is None else apply_rotary(k, cos, sin)), False


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The torch path: x [num_tokens, heads, head_dim], cos/sin [num_tokens, 1, head_dim]."""
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
