"""Per-layer K/V buffers of the token-granular KV pool.

Only KV-producing layers own a buffer: with Cross-Layer Attention (cla_factor k) the pool holds
ceil(num_layers / k) buffers, and with GQA/MQA each buffer is [num_slots, num_kv_heads, head_dim].
"""

from __future__ import annotations

import torch

from sglite.runtime.models.config import ModelConfig


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

    def get_kv(self, kv_layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[kv_layer_id], self.v_buffers[kv_layer_id]

    def store(self, kv_layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim] written at slots loc [num_tokens]."""
        self.k_buffers[kv_layer_id][loc] = k.to(self.dtype)
        self.v_buffers[kv_layer_id][loc] = v.to(self.dtype)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_kv_buffers * config.num_kv_heads * config.head_dim * elem


def mha_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """What plain multi-head attention (num_kv_heads = num_heads, no CLA) would need."""
    return bytes_per_token(config.replace(num_kv_heads=config.num_heads, cla_factor=1), dtype)
