"""The K/V store kernel against plain indexing."""

import pytest
import torch

from sglite.kernels.reference import store_kv_ref
from sglite.kernels.store_kv import store_kv
from tests.kernels.pool import DEVICE


def test_store_kv_from_strided_views():
    gen = torch.Generator().manual_seed(0)
    num_tokens, kv_heads, head_dim = 5, 3, 16
    # K and V as views into one fused projection output, as a model produces them
    kv = torch.randn(num_tokens, 2 * kv_heads * head_dim + 8, generator=gen).to(DEVICE)
    k = kv[:, : kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    v = kv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    loc = torch.tensor([7, 2, 9, 4, 11], device=DEVICE)
    buffers = [torch.randn(12, kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2)]
    expected = [b.clone() for b in buffers]
    store_kv(buffers[0], buffers[1], loc, k, v)
    store_kv_ref(expected[0], expected[1], loc, k, v)
    assert torch.equal(buffers[0], expected[0]) and torch.equal(buffers[1], expected[1])


def test_store_kv_rejects_mismatch():
    buf = torch.zeros(8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        store_kv(buf, buf, torch.tensor([1]), torch.zeros(1, 3, 16), torch.zeros(1, 3, 16))
