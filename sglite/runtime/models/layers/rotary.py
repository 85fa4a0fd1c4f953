"""Rotary position embedding: cos/sin from positions, the q/k rotation, and the rope scaling rules.

Scaling types (HF `rope_scaling`, numerically as transformers' modeling_rope_utils):
  linear, llama3, yarn (static: one inv_freq and an attention factor on cos/sin);
  dynamic (NTK) and longrope / su (Phi-3): frequencies that depend on the sequence length.
For the last two a token at position p is rotated with the frequencies transformers uses at
sequence length p + 1, i.e. as it rotates that token when generating it one step at a time:
dynamic NTK rescales the base for p + 1 > max_position_embeddings, longrope takes long_factor for
p + 1 > original_max_position_embeddings. So a position's K never depends on how long the request
later grows nor on how it was chunked or batched, which the prefix cache relies on. (transformers
and vLLM rotate a whole prompt longer than the original context with the long/rescaled frequencies
instead; for prompts within it all agree.)

partial_rotary_factor < 1 (Phi-4-mini): only the first rotary_dim dims of each head rotate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sglite.runtime.models.layers.fused import use_fused

SCALING_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "su")


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate_half) rope; cos/sin computed once per forward from the positions.

    max_position: the config's max_position_embeddings (dynamic NTK's original length, longrope's
    target); original_max_position: Phi-3's top-level original_max_position_embeddings."""

    def __init__(self, head_dim: int, *, theta: float, scaling: dict | None = None,
                 rotary_dim: int | None = None, max_position: int | None = None,
                 original_max_position: int | None = None):
        super().__init__()
        with torch.device("cpu"):  # the model may be built under torch.device("meta")
            self._build(head_dim, theta, scaling, rotary_dim, max_position, original_max_position)

    def _build(self, head_dim, theta, scaling, rotary_dim, max_position, original_max_position):
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim = rotary_dim or head_dim
        self.theta = theta
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        inv_freq = 1.0 / (theta**exponents)
        kind = _scaling_type(scaling)
        self.kind = kind
        self.attention_factor = 1.0
        self.switch_len: int | None = None  # dynamic / longrope: p + 1 above it switches
        self.long_inv_freq_cpu: torch.Tensor | None = None
        if kind in ("default", "linear", "llama3"):
            inv_freq = _scale_inv_freq(inv_freq, scaling)
        elif kind == "yarn":
            inv_freq, self.attention_factor = _yarn(
                theta, rotary_dim, scaling, max_position or 2048)
        elif kind == "dynamic":
            self.switch_len = max_position or 2048
            self.dynamic_factor = float(scaling["factor"])
        else:  # longrope / su
            inv_freq, self.long_inv_freq_cpu, self.attention_factor, self.switch_len = _longrope(
                theta, rotary_dim, scaling, max_position, original_max_position)
        self.inv_freq_cpu = inv_freq  # plain attrs: survive meta init
        self._device_cache: dict = {}

    @property
    def partial(self) -> bool:
        return self.rotary_dim != self.head_dim

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [num_tokens] -> (cos, sin): fused path fp32 [num_tokens, head_dim / 2];
        torch path [num_tokens, 1, rotary_dim] in dtype (as transformers rounds them)."""
        freqs = self._freqs(positions)  # [T, rotary_dim / 2] fp32
        if use_fused(positions) and not self.partial:
            cos, sin = freqs.cos(), freqs.sin()
            if self.attention_factor != 1.0:
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
            return cos, sin
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def inv_freq_on(self, device) -> torch.Tensor:
        """The (scaled) inverse frequencies in fp32 on device (cached per device)."""
        return self._on(device)["inv"]

    def _on(self, device) -> dict:
        cache = self._device_cache.get(device)
        if cache is None:
            cache = {"inv": self.inv_freq_cpu.to(device)}
            if self.long_inv_freq_cpu is not None:
                cache["long"] = self.long_inv_freq_cpu.to(device)
            if self.kind == "dynamic":
                exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
                cache["exps"] = exps.to(device)
            self._device_cache[device] = cache
        return cache

    def _freqs(self, positions: torch.Tensor) -> torch.Tensor:
        c = self._on(positions.device)
        # int64 * fp32 promotes to fp32 inside the one kernel: the same products as transformers'
        if self.kind == "longrope" or self.kind == "su":
            inv = torch.where((positions + 1 > self.switch_len)[:, None], c["long"][None, :], c["inv"][None, :])
            return positions[:, None] * inv
        if self.kind == "dynamic":
            # transformers' _compute_dynamic_ntk_parameters at seq_len = max(p + 1, M), in fp32
            factor, m = self.dynamic_factor, self.switch_len
            seq = torch.clamp(positions + 1, min=m)
            base = self.theta * ((factor * seq / m) - (factor - 1)) ** (self.rotary_dim / (self.rotary_dim - 2))
            scaled = 1.0 / (base[:, None] ** c["exps"][None, :])
            inv = torch.where((positions + 1 > m)[:, None], scaled, c["inv"][None, :])
            return positions[:, None] * inv
        return positions[:, None] * c["inv"][None, :]


def rotate_qk(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *,
              v: torch.Tensor | None = None, kv_destination=None):
    """q [T, H, D], k [T, KH, D] or None -> (q, k, stored): rotated, on CUDA in place in one
    launch. kv_destination: (k_buffer, v_buffer, slots) from the attention backend; on CUDA that
    launch also stores the rotated k and v there, and stored says whether it did. cos/sin as
    RotaryEmbedding.forward returns them (3-D: the torch path, partial rotary included)."""
    if use_fused(q) and cos.dim() == 2:
        from sglite.kernels.rotary import apply_rotary_qk

        store = kv_destination is not None and k is not None
        dest = dict(zip(("k_buffer", "v_buffer", "loc"), kv_destination)) if store else {}
        apply_rotary_qk(q, k, cos, sin, v=v if store else None, **dest)
        return q, k, store
    return apply_rotary(q, cos, sin), (None if k is None else apply_rotary(k, cos, sin)), False


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The torch path: x [num_tokens, heads, head_dim], cos/sin [num_tokens, 1, rotary_dim]
    (rotary_dim < head_dim: the remaining dims pass through)."""
    rot = cos.shape[-1]
    if rot != x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _scaling_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind not in SCALING_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(SCALING_TYPES)})")
    return kind


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    kind = _scaling_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    assert kind == "llama3", kind
    # Llama 3.1: long wavelengths are slowed by `factor`, short kept, the band between blended
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(base: float, dim: int, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5 long context, DeepSeek): transformers' _compute_yarn_parameters."""
    factor = scaling["factor"]
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    old_len = scaling.get("original_max_position_embeddings") or max_position

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def _longrope(base, dim, scaling, max_position, original_max_position):
    """LongRoPE (Phi-3 / 3.5 / 4): per-dimension rescale factors, short within the original
    context and long beyond it; cos/sin scaled by sqrt(1 + ln(s) / ln(original))."""
    factor = scaling.get("factor")
    attention_factor = scaling.get("attention_factor")
    if original_max_position:  # Phi-3: the ratio of the two lengths, not rope_scaling's factor
        old_len = original_max_position
        factor = max_position / original_max_position if max_position else factor
    else:  # as transformers reads it (rope_scaling's own original length is not used there)
        old_len = max_position
    if attention_factor is None:
        attention_factor = 1.0 if factor is None or factor <= 1.0 else math.sqrt(
            1 + math.log(factor) / math.log(old_len))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    for key in ("short_factor", "long_factor"):
        if len(scaling[key]) != dim // 2:
            raise ValueError(f"rope_scaling {key} has {len(scaling[key])} entries, rotary dim {dim} needs {dim // 2}")
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * base**shape)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * base**shape)
    return short, long, float(attention_factor), int(old_len)


def rotary_from_config(config, *, theta: float | None = None, scaling: dict | None = ...) -> RotaryEmbedding:
    """The RotaryEmbedding a ModelConfig describes (theta / scaling: overrides, as Gemma 3's
    sliding layers use a local base without scaling)."""
    rotary_dim = int(config.head_dim * getattr(config, "partial_rotary_factor", 1.0))
    return RotaryEmbedding(
        config.head_dim, theta=config.rope_theta if theta is None else theta,
        scaling=config.rope_scaling if scaling is ... else scaling, rotary_dim=rotary_dim,
        max_position=config.max_position_embeddings,
        original_max_position=getattr(config, "original_max_position_embeddings", None),
    )
