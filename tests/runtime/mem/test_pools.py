"""TokenPool / ReqToToken / KVCache invariants."""

from __future__ import annotations

import random

import pytest
import torch

from sglite.runtime.models.config import ModelConfig
from sglite.runtime.mem.kv_cache import KVCache, bytes_per_token, mha_bytes_per_token
from sglite.runtime.mem.req_to_token import ReqToToken
from sglite.runtime.mem.token_pool import TokenPool


def test_token_pool_random_cycles_keep_every_slot_accounted():
    pool, rng, held = TokenPool(100), random.Random(0), []
    for _ in range(500):
        if held and rng.random() < 0.45:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            slots = pool.alloc(rng.randint(1, 30))
            if slots is None:
                assert pool.available_size < 30
                continue
            held.append(slots)
        in_use = torch.cat(held) if held else torch.empty(0, dtype=torch.int64)
        assert in_use.unique().numel() == in_use.numel(), "a slot was handed out twice"
        assert not bool((in_use == 0).any()), "slot 0 was handed out"
        assert pool.available_size + in_use.numel() == pool.total_size
    pool.check_integrity()
    for slots in held:
        pool.free(slots)
    assert pool.available_size == 100
    assert sorted(pool.alloc(100).tolist()) == list(range(1, 101))
    assert pool.alloc(1) is None


def test_token_pool_rejects_double_free_and_slot_zero():
    pool = TokenPool(8)
    slots = pool.alloc(3)
    pool.free(slots[:1])
    with pytest.raises(AssertionError, match="double free"):
        pool.free(slots[:1])
    with pytest.raises(AssertionError, match="slot 0"):
        pool.free(torch.tensor([0]))
    with pytest.raises(AssertionError, match="twice"):
        pool.free(torch.cat([slots[1:2], slots[1:2]]))
    assert pool.alloc(9) is None and pool.available_size == 6


def test_req_to_token_rows_and_writes():
    table = ReqToToken(3, 16)
    rows = [table.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2] and table.alloc() is None
    table.write(rows[1], 4, torch.tensor([7, 8, 9]))
    assert table.read(rows[1], 3, 8).tolist() == [0, 7, 8, 9, 0]
    with pytest.raises(ValueError, match="max_context_len"):
        table.write(rows[1], 14, torch.tensor([1, 2, 3]))
    table.free(rows[0])
    with pytest.raises(AssertionError):
        table.free(rows[0])
    assert table.available_size == 1


def test_kv_cache_bytes_and_capacity_with_gqa_mqa_cla():
    base = ModelConfig.from_preset("llama-3-8b")  # 32 layers, 32 heads, 8 kv heads, head_dim 128
    bf16 = torch.bfloat16
    assert bytes_per_token(base, bf16) == 2 * 32 * 8 * 128 * 2
    assert mha_bytes_per_token(base, bf16) == 2 * 32 * 32 * 128 * 2
    assert bytes_per_token(base.replace(num_kv_heads=1), bf16) == 2 * 32 * 1 * 128 * 2
    assert bytes_per_token(base.replace(num_kv_heads=1, cla_factor=2), bf16) == 2 * 16 * 128 * 2
    tiny = ModelConfig.from_preset("tiny", num_kv_heads=1, cla_factor=2)  # 4 layers -> 2 buffers
    cache = KVCache.for_model(tiny, dtype=torch.float32, kv_memory_bytes=2 * 2 * 16 * 4 * 101)
    assert cache.num_buffers == 2 and cache.bytes_per_token == 2 * 2 * 16 * 4
    assert cache.capacity == 100 and cache.k_buffers[0].shape == (101, 1, 16)
    odd = KVCache.for_model(ModelConfig.from_preset("tiny", cla_factor=3), dtype=torch.float32,
                            max_total_tokens=10)
    assert odd.num_buffers == 2 and odd.num_slots == 11  # layers {0,1,2} and {3}
