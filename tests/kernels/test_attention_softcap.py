"""Attention logit soft-capping (Gemma 2: scores s -> cap * tanh(s / cap)) in the decode and
extend kernels against the torch reference, with and without a sliding window."""

import pytest
import torch

from sglite.kernels.decode_attention import decode_attention_fwd
from sglite.kernels.extend_attention import extend_attention_fwd
from sglite.kernels.reference import decode_attention_ref, extend_attention_ref
from tests.kernels.pool import FP32_TOL, make_scenario, rel_err

CAP = 2.0  # small against the scores below, so capping changes the result a lot


@pytest.mark.parametrize("window,num_splits", [(None, 3), (5, 2)])
def test_decode_softcap_matches_reference(window, num_splits):
    sc = make_scenario([0, 8, 30], [1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=32,
                       sliding_window=window)
    sc.q.mul_(8.0)  # scores of several units: tanh saturates for many keys
    out = torch.full_like(sc.q, float("nan"))
    decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token,
                         sc.tensor(sc.rows, torch.int64), sc.tensor(sc.seq_lens), scale=sc.scale,
                         num_splits=num_splits, sliding_window=window, logit_cap=CAP)
    args = (sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens)
    ref = decode_attention_ref(*args, scale=sc.scale, sliding_window=window, logit_cap=CAP)
    uncapped = decode_attention_ref(*args, scale=sc.scale, sliding_window=window)
    assert rel_err(out, ref) < FP32_TOL
    assert rel_err(uncapped, ref) > 100 * FP32_TOL  # the cap matters here


@pytest.mark.parametrize("window", [None, 6])
def test_extend_softcap_matches_reference(window):
    sc = make_scenario([0, 7], [19, 5], num_heads=4, num_kv_heads=1, head_dim=16, sliding_window=window)
    sc.q.mul_(8.0)
    out = torch.full_like(sc.q, float("nan"))
    extend_attention_fwd(sc.q, sc.k_new, sc.v_new, out, sc.k_buffer, sc.v_buffer, sc.req_to_token,
                         sc.tensor(sc.rows, torch.int64), sc.tensor(sc.prefix_lens),
                         sc.tensor(sc.extend_lens), sc.extend_start_loc,
                         max_extend_len=max(sc.extend_lens), scale=sc.scale, sliding_window=window,
                         logit_cap=CAP)
    args = (sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.prefix_lens, sc.extend_lens)
    ref = extend_attention_ref(*args, scale=sc.scale, sliding_window=window, logit_cap=CAP)
    uncapped = extend_attention_ref(*args, scale=sc.scale, sliding_window=window)
    assert rel_err(out, ref) < FP32_TOL
    assert rel_err(uncapped, ref) > 100 * FP32_TOL
