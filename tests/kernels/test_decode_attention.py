"""Decode attention (split KV + LSE merge) against the torch reference."""

import pytest
import torch

from sglite.kernels.decode_attention import MAX_SPLITS, decode_attention_fwd, decode_num_splits
from sglite.kernels.reference import decode_attention_ref
from tests.kernels.pool import FP32_TOL, make_scenario, rel_err


def decode_scenario(seq_lens, **kw):
    return make_scenario([n - 1 for n in seq_lens], [1] * len(seq_lens), **kw)


def run_decode(sc, *, num_splits, sliding_window=None, global_tokens=0, tiles=None):
    out = torch.full_like(sc.q, float("nan"))
    decode_attention_fwd(
        sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
        sc.tensor(sc.seq_lens), scale=sc.scale, num_splits=num_splits,
        sliding_window=sliding_window, global_tokens=global_tokens, tiles=tiles,
    )
    return out


# (query heads, KV heads, head_dim, window, globals, splits)
CASES = [
    (2, 2, 32, None, 0, 1),  # MHA, one split
    (8, 2, 32, None, 0, 4),  # GQA group 4, splits of which the last is empty for seq 40
    (16, 2, 16, 7, 2, 3),  # GQA group 8, window + global tokens, split over the visible keys
    (6, 1, 64, 5, 0, 8),  # MQA, group 6, more splits than visible keys
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,num_global,num_splits", CASES)
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, window, num_global, num_splits):
    sc = decode_scenario([1, 9, 40], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         sliding_window=window, global_tokens=num_global)
    out = run_decode(sc, num_splits=num_splits, sliding_window=window, global_tokens=num_global)
    ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                               scale=sc.scale, sliding_window=window, global_tokens=num_global)
    assert not out.isnan().any()
    assert rel_err(out, ref) < FP32_TOL


def test_split_count_independent():
    sc = decode_scenario([33, 50], num_heads=4, num_kv_heads=1, head_dim=16, seed=3)
    one = run_decode(sc, num_splits=1)
    assert torch.allclose(run_decode(sc, num_splits=5), one, atol=FP32_TOL)


def test_num_splits_policy():
    # batch 1 x 8 KV heads on 132 SMs: as many splits as allowed; a full batch needs few
    assert decode_num_splits(1, 8, num_sms=132) == MAX_SPLITS
    assert decode_num_splits(64, 8, num_sms=132) == 1  # 512 programs already fill 132 SMs
    assert decode_num_splits(16, 8, num_sms=132) == 5
    assert decode_num_splits(1, 8, num_sms=132, max_kv_len=1000) == 8  # >= 128 keys per split


def test_decode_rejects_bad_splits():
    sc = decode_scenario([4], num_heads=2, num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="num_splits"):
        run_decode(sc, num_splits=0)
