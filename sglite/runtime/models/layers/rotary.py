"""Rotary position embedding: cos/sin from positions, the q/k rotation, and the rope scaling rules."""

from __future__ import annotations

import math

import torch
from torch import nn

from sglite.runtime.models.layers.fused import use_fused


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
