"""TritonAttentionBackend against the torch backend on a tiny model's layers: an extend, an extend
on top of a cached prefix, then a decode; one layer produces KV, a CLA layer reuses it with a
sliding window + global tokens (its new K/V come from the pool)."""

import torch

from sglite.runtime.executor.attention.base import AttentionLayer, ForwardBatch, ForwardMode
from sglite.runtime.executor.attention.torch_backend import TorchAttentionBackend
from sglite.runtime.executor.attention.triton_backend import TritonAttentionBackend
from sglite.runtime.models.config import ModelConfig
from sglite.runtime.mem.kv_cache import KVCache
from tests.kernels.pool import DEVICE, FP32_TOL, rel_err

CONFIG = ModelConfig.from_preset("tiny", num_heads=8, num_kv_heads=2, head_dim=16)
LAYERS = [
    AttentionLayer(layer_id=0, kv_layer_id=0, produces_kv=True, num_heads=8, num_kv_heads=2,
                   head_dim=16, scale=0.25),
    AttentionLayer(layer_id=1, kv_layer_id=0, produces_kv=False, num_heads=8, num_kv_heads=2,
                   head_dim=16, scale=0.25, sliding_window=5, global_tokens=2),
]


def make_batch(mode, req_to_token, rows, prefix_lens, extend_lens, next_slot):
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    locs = []
    for row, p, n in zip(rows, prefix_lens, seq_lens):
        slots = torch.arange(next_slot, next_slot + n - p)
        next_slot += n - p
        req_to_token[row, p:n] = slots.int()
        locs.append(slots)
    num_tokens = sum(extend_lens)
    def dev(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=DEVICE)

    batch = ForwardBatch(
        mode=mode, input_ids=dev([0] * num_tokens, torch.int64),
        positions=torch.cat([torch.arange(p, n) for p, n in zip(prefix_lens, seq_lens)]).to(DEVICE),
        req_pool_indices=dev(rows, torch.int64), seq_lens=dev(seq_lens), prefix_lens=dev(prefix_lens),
        extend_lens=dev(extend_lens), out_cache_loc=torch.cat(locs).to(DEVICE),
        req_to_token=req_to_token.to(DEVICE),
        seq_lens_cpu=seq_lens, prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=list(extend_lens),
    )
    return batch, next_slot


def run_layers(backend, batch, inputs):
    backend.init_forward(batch)
    outs = []
    for layer, (q, k, v) in zip(LAYERS, inputs):
        outs.append(backend.forward(q, k if layer.produces_kv else None, v if layer.produces_kv else None,
                                    layer, batch))
    return outs


def test_triton_backend_matches_torch_backend():
    gen = torch.Generator().manual_seed(0)
    caches = [KVCache(num_buffers=1, num_kv_heads=2, head_dim=16, num_slots=64, dtype=torch.float32,
                      device=DEVICE) for _ in range(2)]
    backends = [TorchAttentionBackend(kv_cache=caches[0], model_config=CONFIG, device=DEVICE),
                TritonAttentionBackend(kv_cache=caches[1], model_config=CONFIG, device=DEVICE)]
    req_to_token = torch.zeros(4, 32, dtype=torch.int32)
    rows, next_slot = [2, 0], 1
    steps = [(ForwardMode.EXTEND, [0, 0], [6, 3]), (ForwardMode.EXTEND, [6, 3], [4, 9]),
             (ForwardMode.DECODE, [10, 12], [1, 1])]
    for mode, prefix_lens, extend_lens in steps:
        batch, next_slot = make_batch(mode, req_to_token, rows, prefix_lens, extend_lens, next_slot)
        t = batch.num_tokens
        inputs = [tuple(torch.randn(t, heads, 16, generator=gen).to(DEVICE) for heads in (8, 2, 2))
                  for _ in LAYERS]
        expected = run_layers(backends[0], batch, inputs)
        got = run_layers(backends[1], batch, inputs)
        for layer, e, g in zip(LAYERS, expected, got):
            assert rel_err(g, e) < FP32_TOL, (mode, layer.layer_id)
    assert torch.equal(caches[0].k_buffers[0], caches[1].k_buffers[0])
    assert torch.equal(caches[0].v_buffers[0], caches[1].v_buffers[0])
