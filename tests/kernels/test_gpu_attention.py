"""The compiled kernels at real shapes in bf16/fp16 on a GPU (skipped without one)."""

import pytest
import torch

from sglite.kernels.decode_policy import decode_num_splits
from sglite.kernels.reference import decode_attention_ref, extend_attention_ref
from tests.kernels.pool import make_scenario, rel_err
from tests.kernels.test_decode_attention import run_decode
from tests.kernels.test_extend_attention import run_extend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 1e-2  # bf16 operands: ~3e-3 expected


# (query heads, KV heads, head_dim, dtype, window, globals)
SHAPES = [
    (32, 8, 128, torch.bfloat16, None, 0),  # Llama-3-8B
    (32, 8, 128, torch.bfloat16, 700, 4),  # the same with a window + attention sinks
    (16, 1, 64, torch.float16, None, 0),  # MQA, d=64
    (8, 2, 256, torch.bfloat16, 300, 0),  # d=256
    (14, 2, 64, torch.bfloat16, None, 0),  # group 7
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype,window,num_global", SHAPES)
def test_extend_real_shapes(num_heads, num_kv_heads, head_dim, dtype, window, num_global):
    sc = make_scenario([0, 1000, 1537], [517, 64, 1024], num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, dtype=dtype, sliding_window=window, global_tokens=num_global)
    out = run_extend(sc, sliding_window=window, global_tokens=num_global)
    ref = extend_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.prefix_lens,
                               sc.extend_lens, scale=sc.scale, sliding_window=window, global_tokens=num_global)
    assert not out.isnan().any()
    assert rel_err(out, ref) < BF16_TOL


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype,window,num_global", SHAPES)
def test_decode_real_shapes(num_heads, num_kv_heads, head_dim, dtype, window, num_global):
    seq_lens = [1, 77, 1000, 4096, 2500, 8192]
    sc = make_scenario([n - 1 for n in seq_lens], [1] * len(seq_lens), num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                       sliding_window=window, global_tokens=num_global)
    splits = decode_num_splits(len(seq_lens), num_kv_heads, num_sms=132, max_kv_len=max(seq_lens))
    out = run_decode(sc, num_splits=splits, sliding_window=window, global_tokens=num_global)
    ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                               scale=sc.scale, sliding_window=window, global_tokens=num_global)
    assert not out.isnan().any()
    assert rel_err(out, ref) < BF16_TOL
