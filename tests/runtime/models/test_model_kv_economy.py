"""CLA, MQA, sliding window + global tokens: the paged executor against a dense reference that
applies the same masks and KV sharing to whole sequences (small random models, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.models.layers import apply_rotary

CASES = {
    "gqa-cla2": dict(num_kv_heads=2, cla_factor=2),
    "mqa-cla3": dict(num_kv_heads=1, cla_factor=3),
    "window4-global2": dict(sliding_window=4, global_tokens=2),
    "mqa-cla2-window3-global1-interleaved": dict(
        num_kv_heads=1, cla_factor=2, sliding_window=3, global_tokens=1,
        sliding_window_layers=(True, False, True, True),
    ),
}


@torch.inference_mode()
def dense_reference(model, ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] of one whole sequence, attention written out with explicit masks."""
    cfg = model.config
    pos = torch.arange(len(ids))
    x = model.model.embed_tokens(torch.tensor(ids))
    cos, sin = model.rotary(pos, x.dtype)
    kv_of_group = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q_size = cfg.num_heads * cfg.head_dim
        qkv = F.linear(h, attn.qkv_proj.weight)
        q = apply_rotary(qkv[:, :q_size].view(len(ids), cfg.num_heads, cfg.head_dim), cos, sin)
        if cfg.produces_kv(i):
            k, v = qkv[:, q_size:].view(len(ids), 2, cfg.num_kv_heads, cfg.head_dim).unbind(1)
            kv_of_group[i // cfg.cla_factor] = (apply_rotary(k, cos, sin), v)
        k, v = kv_of_group[i // cfg.cla_factor]  # CLA: reuse the group's first layer's KV
        group = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [T, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * cfg.head_dim**-0.5
        mask = _dense_mask(len(ids), cfg.window_for_layer(i), cfg.global_tokens)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), q_size)
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return F.linear(model.model.norm(x), model.model.embed_tokens.weight)


def _dense_mask(n: int, window: int | None, num_global: int) -> torch.Tensor:
    """[q, k] bool, written independently of the backend: causal, and within the window or global."""
    mask = torch.ones(n, n).tril().bool()
    if window is not None:
        for q in range(n):
            for k in range(q + 1):
                mask[q, k] = q - k < window or k < num_global
    return mask


@pytest.mark.parametrize("case", list(CASES))
def test_kv_economy_matches_dense_reference(case):
    runner = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=256,
                         max_running_requests=4, config_overrides=CASES[case], seed=3)
    cfg = runner.model_config
    assert runner.kv_cache.num_buffers == -(-cfg.num_layers // cfg.cla_factor)
    for layer in runner.model.model.layers:  # CLA consumers have no K/V projection at all
        assert layer.self_attn.qkv_proj.weight.shape[0] == cfg.num_heads * cfg.head_dim + (
            2 * cfg.num_kv_heads * cfg.head_dim if layer.self_attn.produces_kv else 0)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (16, 11)]
    ref = [dense_reference(runner.model, s) for s in seqs]
    rows = [runner.req_to_token.alloc() for _ in seqs]
    # request 0: prefix of 5, then both requests extend in one batch, then decode to the end
    loc = runner.token_pool.alloc(5)
    runner.forward(runner.make_extend_batch(rows[:1], [0], [seqs[0][:5]], loc))
    new_ids = [seqs[0][5:9], seqs[1][:4]]
    loc = runner.token_pool.alloc(8)
    logits = runner.forward(runner.make_extend_batch(rows, [5, 0], new_ids, loc, return_all_logits=True))
    torch.testing.assert_close(logits, torch.cat([ref[0][5:9], ref[1][:4]]), atol=1e-4, rtol=1e-4)
    seq_lens = [9, 4]
    while seq_lens[1] < len(seqs[1]):
        last = [s[n] for s, n in zip(seqs, seq_lens)]
        seq_lens = [n + 1 for n in seq_lens]
        logits = runner.forward(runner.make_decode_batch(rows, seq_lens, last, runner.token_pool.alloc(2)))
        expect = torch.stack([r[n - 1] for r, n in zip(ref, seq_lens)])
        torch.testing.assert_close(logits, expect, atol=1e-4, rtol=1e-4)


def test_window_and_globals_change_the_output():
    """Guards the test above against a mask that silently does nothing."""
    base = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=64, seed=3)
    windowed = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=64,
                           seed=3, config_overrides=dict(sliding_window=3, global_tokens=1))
    ids = list(range(10, 22))
    a, b = (dense_reference(r.model, ids) for r in (base, windowed))
    torch.testing.assert_close(a[:3], b[:3])  # within the window nothing differs
    assert (a[5:] - b[5:]).abs().max() > 1e-3
