"""Per-layer K/V buffers of the token-granular KV pool.

Only KV-producing layers own a buffer: with Cross-Layer Attention (cla_factor k) the pool holds
ceil(num_layers / k) buffers, and with GQA/MQA each buffer is [num_slots, num_kv_heads, head_dim].

FP8 (dtype float8_e4m3fn, `kv_cache_dtype="fp8_e4m3"`): the buffers hold K / k_scale and
V / v_scale rounded to e4m3 (saturated at +-448), one static fp32 scale per buffer (1.0, as vLLM
uses without calibrated scales: K and V of the models served sit well inside e4m3's range), so the
pool holds twice the bf16 tokens in the same memory. Readers dequantize (`gather`) or fold the
scales into the attention kernels, which accumulate in fp32.
"""

from __future__ import annotations

import torch

from sglite.runtime.models.config import ModelConfig

FP8_DTYPE = torch.float8_e4m3fn
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # auto: the model's dtype


class KVCache:
    def __init__(
        self,
        *,
        num_buffers: int,
        num_kv_heads: int,
        head_dim: int,
        num_slots: int,  # including the reserved slot 0
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ):
        self.num_buffers = num_buffers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_slots = num_slots
        self.dtype = dtype
        # runs of consecutive slots the allocator hands out (its owner sets it; decode attention
        # loads a tile that lies in one run in bulk)
        self.page_size = 1
        shape = (num_slots, num_kv_heads, head_dim)
        # zeros, not empty: masked-out slots still enter the softmax as 0 * value, and a NaN
        # left in uninitialized memory would poison the whole row
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_buffers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_buffers)]
        self.k_scales = [1.0] * num_buffers  # dequantized K = stored K * k_scale (FP8 only)
        self.v_scales = [1.0] * num_buffers

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        max_total_tokens: int | None = None,
        kv_memory_bytes: int | None = None,
    ) -> KVCache:
        """Sized by max_total_tokens (usable slots) or else by a byte budget."""
        per_token = bytes_per_token(config, dtype)
        if max_total_tokens is None:
            if kv_memory_bytes is None:
                raise ValueError("KVCache.for_model needs max_total_tokens or kv_memory_bytes")
            max_total_tokens = kv_memory_bytes // per_token - 1
        if max_total_tokens < 1:
            raise ValueError(f"KV budget holds no token ({per_token} bytes per token needed)")
        return cls(
            num_buffers=config.num_kv_buffers, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, num_slots=max_total_tokens + 1, dtype=dtype, device=device,
        )

    @property
    def capacity(self) -> int:
        """Usable slots (slot 0 excluded)."""
        return self.num_slots - 1

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_buffers * self.num_kv_heads * self.head_dim * elem

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.num_slots

    @property
    def is_fp8(self) -> bool:
        return self.dtype == FP8_DTYPE

    def get_kv(self, kv_layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[kv_layer_id], self.v_buffers[kv_layer_id]

    def get_scales(self, kv_layer_id: int) -> tuple[float, float]:
        """(k_scale, v_scale) of a buffer: 1.0 unless FP8."""
        return self.k_scales[kv_layer_id], self.v_scales[kv_layer_id]

    def store(self, kv_layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim] written at slots loc [num_tokens]."""
        k_scale, v_scale = self.get_scales(kv_layer_id)
        self.k_buffers[kv_layer_id][loc] = self._encode(k, k_scale)
        self.v_buffers[kv_layer_id][loc] = self._encode(v, v_scale)

    def gather(self, kv_layer_id: int, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at slots idx (any shape) -> [*idx.shape, num_kv_heads, head_dim] in dtype,
        dequantized."""
        k_scale, v_scale = self.get_scales(kv_layer_id)
        k, v = self.k_buffers[kv_layer_id][idx], self.v_buffers[kv_layer_id][idx]
        if not self.is_fp8:
            return k.to(dtype), v.to(dtype)
        return (k.float() * k_scale).to(dtype), (v.float() * v_scale).to(dtype)

    def _encode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.is_fp8:
            return x.to(self.dtype)
        return (x.float() * (1.0 / scale)).clamp(-448.0, 448.0).to(FP8_DTYPE)


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element dtype for a kv_cache_dtype name."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
    return FP8_DTYPE if kv_cache_dtype == "fp8_e4m3" else model_dtype


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_kv_buffers * config.num_kv_heads * config.head_dim * elem


def mha_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """What plain multi-head attention (num_kv_heads = num_heads, no CLA) would need."""
    return bytes_per_token(config.replace(num_kv_heads=config.num_heads, cla_factor=1), dtype)
