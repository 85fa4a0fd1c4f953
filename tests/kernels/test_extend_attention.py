"""Extend attention (cached prefix + causal new tokens) against the torch reference."""

import pytest
import torch

from sglite.kernels.extend_attention import extend_attention_fwd
from sglite.kernels.reference import extend_attention_ref
from tests.kernels.pool import FP32_TOL, make_scenario, rel_err


def run_extend(sc, *, from_pool=False, sliding_window=None, global_tokens=0, tiles=None):
    out = torch.full_like(sc.q, float("nan"))  # poisoned: every element must be written
    extend_attention_fwd(
        sc.q, None if from_pool else sc.k_new, None if from_pool else sc.v_new, out,
        sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
        sc.tensor(sc.prefix_lens), sc.tensor(sc.extend_lens), sc.extend_start_loc,
        max_extend_len=max(sc.extend_lens), scale=sc.scale, out_cache_loc=sc.out_cache_loc,
        sliding_window=sliding_window, global_tokens=global_tokens, tiles=tiles,
    )
    return out


def reference(sc, *, sliding_window=None, global_tokens=0):
    return extend_attention_ref(
        sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.prefix_lens, sc.extend_lens,
        scale=sc.scale, sliding_window=sliding_window, global_tokens=global_tokens,
    )


# (query heads, KV heads, head_dim, window, globals, new K/V read from the pool)
CASES = [
    (2, 2, 32, None, 0, False),  # MHA (group 1)
    (8, 2, 16, None, 0, True),  # GQA group 4, CLA-style: new K/V through out_cache_loc
    (16, 2, 32, 6, 2, False),  # GQA group 8, window + global tokens
    (6, 1, 64, 5, 0, True),  # MQA, group 6 (not a power of two), window only
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,num_global,from_pool", CASES)
def test_extend_matches_reference(num_heads, num_kv_heads, head_dim, window, num_global, from_pool):
    # ragged: no prefix, a short prefix, a prefix longer than the window; a one-token extend
    sc = make_scenario([0, 5, 19], [9, 1, 13], num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, sliding_window=window, global_tokens=num_global)
    out = run_extend(sc, from_pool=from_pool, sliding_window=window, global_tokens=num_global)
    ref = reference(sc, sliding_window=window, global_tokens=num_global)
    assert not out.isnan().any()
    assert rel_err(out, ref) < FP32_TOL


def test_extend_window_larger_than_context_equals_full():
    sc = make_scenario([3, 7], [11, 4], num_heads=4, num_kv_heads=2, head_dim=16, seed=1)
    full = run_extend(sc)
    assert torch.allclose(run_extend(sc, sliding_window=64, global_tokens=2), full, atol=FP32_TOL)
    assert rel_err(full, reference(sc)) < FP32_TOL


def test_extend_rejects_mismatched_heads():
    sc = make_scenario([0], [4], num_heads=6, num_kv_heads=3, head_dim=16)
    with pytest.raises(ValueError, match="heads"):
        extend_attention_fwd(
            sc.q[:, :4], sc.k_new, sc.v_new, torch.empty_like(sc.q[:, :4]), sc.k_buffer[:, :3],
            sc.v_buffer[:, :3], sc.req_to_token, sc.tensor(sc.rows, torch.int64),
            sc.tensor(sc.prefix_lens), sc.tensor(sc.extend_lens), sc.extend_start_loc,
            max_extend_len=4, scale=1.0)
    with pytest.raises(ValueError, match="out_cache_loc"):
        extend_attention_fwd(
            sc.q, None, None, torch.empty_like(sc.q), sc.k_buffer, sc.v_buffer, sc.req_to_token,
            sc.tensor(sc.rows, torch.int64), sc.tensor(sc.prefix_lens), sc.tensor(sc.extend_lens),
            sc.extend_start_loc, max_extend_len=4, scale=1.0)
