"""An FP8 (e4m3) KV pool: store_kv's rounding against torch's, and the decode / extend kernels
reading FP8 K/V with their scales against the reference on the dequantized pool."""

import pytest
import torch

from sglite.kernels.decode_attention import decode_attention_fwd
from sglite.kernels.decode_policy import decode_tiles
from sglite.kernels.extend_attention import extend_attention_fwd
from sglite.kernels.reference import decode_attention_ref, extend_attention_ref
from sglite.kernels.store_kv import store_kv
from tests.kernels.pool import DEVICE, make_scenario, rel_err

FP8 = torch.float8_e4m3fn
# fp16 q and widened K: the interpreter's bf16 dots are wrong; p is rounded to fp16 before the PV dot
TOL = 3e-3


def quantize(buf: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's encoding (torch's cast: round to nearest even, saturated first) and its decoding."""
    q = (buf.float() * (1.0 / scale)).clamp(-448, 448).to(FP8)
    return q, q.float() * scale


def test_store_kv_rounds_like_torch():
    gen = torch.Generator().manual_seed(1)
    num_tokens, heads, dim = 9, 3, 32
    # wide range: subnormals, binade edges, ties (bf16 holds 8 bits, e4m3 keeps 4), saturation
    k = (torch.randn(num_tokens, heads, dim, generator=gen) * torch.logspace(-4, 3, dim)).to(torch.bfloat16)
    k[0, 0, :6] = torch.tensor([25.0, -125.0, 24.5, 449.0, -1000.0, 2.0**-10])
    v = (torch.randn(num_tokens, heads, dim, generator=gen) * 3).to(torch.bfloat16)
    k, v = k.to(DEVICE), v.to(DEVICE)
    k_buf = torch.full((20, heads, dim), float("nan"), device=DEVICE).to(FP8)
    v_buf = k_buf.clone()
    loc = (torch.randperm(19, generator=gen)[:num_tokens] + 1).to(DEVICE)
    store_kv(k_buf, v_buf, loc, k, v, k_scale=0.5, v_scale=0.25)
    ref_k, _ = quantize(k, 0.5)
    ref_v, _ = quantize(v, 0.25)
    assert torch.equal(k_buf[loc].view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_buf[loc].view(torch.uint8), ref_v.view(torch.uint8))
    untouched = torch.ones(20, dtype=torch.bool, device=DEVICE)
    untouched[loc] = False
    assert k_buf[untouched].float().isnan().all()  # other slots not written


def fp8_scenario(prefix_lens, extend_lens, *, k_scale, v_scale, **kw):
    """A scenario whose pool is FP8; the new tokens' K/V are the pool's decoded values, so the
    kernels (which read k/v_extend unquantized) and the reference see the same numbers."""
    sc = make_scenario(prefix_lens, extend_lens, dtype=torch.float16, **kw)
    sc.k_buffer, k_deq = quantize(sc.k_buffer * 4, k_scale)  # K up to ~16: scales < 1 matter
    sc.v_buffer, v_deq = quantize(sc.v_buffer, v_scale)
    sc.k_new, sc.v_new = k_deq[sc.out_cache_loc].half(), v_deq[sc.out_cache_loc].half()
    return sc, k_deq, v_deq


@pytest.mark.parametrize("num_heads,num_kv_heads,num_splits,page_size,v_split", [
    (8, 2, 1, None, 0), (8, 2, 3, 16, 0), (4, 4, 2, None, 0),
    (8, 2, 1, None, 3), (8, 2, 3, 16, 3),  # P.V as even / odd column products (widened bitwise here)
    (8, 2, 2, 16, -3),  # -3: v_split 3 with the TMA loop's first slots 2 tiles ahead (tiles["ahead"])
])
def test_decode_reads_fp8(num_heads, num_kv_heads, num_splits, page_size, v_split):
    seq_lens = [1, 20, 45]
    sc, k_deq, v_deq = fp8_scenario([n - 1 for n in seq_lens], [1] * 3, k_scale=0.05, v_scale=0.02,
                                    num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32,
                                    page_size=page_size)
    out = torch.full_like(sc.q, float("nan"))
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused", tma=page_size is not None,
                 v_split=abs(v_split), ahead=2 if v_split < 0 else 0)
    decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
                         sc.tensor(seq_lens), scale=sc.scale, num_splits=num_splits, k_scale=0.05,
                         v_scale=0.02, tiles=tiles, page_size=page_size or 1)
    ref = decode_attention_ref(sc.q.float(), k_deq, v_deq, sc.req_to_token, sc.rows, seq_lens, scale=sc.scale)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL
    # the scales are applied: reading the stored values as if unscaled is far off
    wrong = decode_attention_ref(sc.q.float(), sc.k_buffer.float(), sc.v_buffer.float(), sc.req_to_token,
                                 sc.rows, seq_lens, scale=sc.scale)
    assert rel_err(out, wrong) > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_splits,page_size,ahead", [(1, 128, 0), (32, 128, 0), (1, None, 0), (32, None, 0),
                                                       (32, 128, 16), (1, 128, 16)])
def test_decode_fp8_default_tiles_on_gpu(num_splits, page_size, ahead):
    """decode_tiles' FP8 picks at a real shape (the PTX widening, TMA bulk loads over pages of 128,
    gathers over random slots), poisoned output, against the reference on the decoded pool."""
    seq_lens = [5, 3000, 9000]
    sc, k_deq, v_deq = fp8_scenario([n - 1 for n in seq_lens], [1] * 3, k_scale=0.05, v_scale=0.02,
                                    num_heads=32, num_kv_heads=8, head_dim=128, page_size=page_size,
                                    seed=num_splits)
    out = torch.full_like(sc.q, float("nan"))
    tiles = None
    if ahead:  # tiles["ahead"] on decode_tiles' pick, one stage more (the tiles' second buffer)
        tiles = decode_tiles(128, device=sc.q.device, num_splits=num_splits, kv_fp8=True)
        tiles.update(ahead=ahead, num_stages=tiles["num_stages"] + 1)
    decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
                         sc.tensor(seq_lens), scale=sc.scale, num_splits=num_splits, k_scale=0.05,
                         v_scale=0.02, page_size=page_size or 1, tiles=tiles)
    ref = decode_attention_ref(sc.q.float(), k_deq, v_deq, sc.req_to_token, sc.rows, seq_lens, scale=sc.scale)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 5e-3  # fp16 weights p over 9000 keys


@pytest.mark.parametrize("num_splits,page_size", [(1, None), (3, 16)])
def test_decode_fp8_q_product(num_splits, page_size):
    """tiles["q_fp8"]: q rounded to e4m3 with one scale per head row, q.K^T an FP8 product: the
    reference on that rounded q (and the pool's decoded K/V) matches to the usual tolerance."""
    seq_lens = [3, 40, 29]
    sc, k_deq, v_deq = fp8_scenario([n - 1 for n in seq_lens], [1] * 3, k_scale=0.05, v_scale=0.02,
                                    num_heads=8, num_kv_heads=2, head_dim=32, page_size=page_size)
    out = torch.full_like(sc.q, float("nan"))
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused", tma=page_size is not None, q_fp8=True)
    decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
                         sc.tensor(seq_lens), scale=sc.scale, num_splits=num_splits, k_scale=0.05,
                         v_scale=0.02, tiles=tiles, page_size=page_size or 1)
    q_sc = sc.q.float().abs().amax(-1, keepdim=True) / 448.0
    q_deq = (sc.q.float() / q_sc).clamp(-448, 448).to(FP8).float() * q_sc
    ref = decode_attention_ref(q_deq, k_deq, v_deq, sc.req_to_token, sc.rows, seq_lens, scale=sc.scale)
    exact_q = decode_attention_ref(sc.q.float(), k_deq, v_deq, sc.req_to_token, sc.rows, seq_lens, scale=sc.scale)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL
    assert rel_err(out, exact_q) < 5e-2  # what rounding q costs


@pytest.mark.parametrize("from_pool,window", [(False, None), (True, None), (False, 6)])
def test_extend_reads_fp8_prefix(from_pool, window):
    sc, k_deq, v_deq = fp8_scenario([0, 13, 30], [5, 7, 18], k_scale=0.05, v_scale=0.02,
                                    num_heads=8, num_kv_heads=2, head_dim=32, sliding_window=window)
    out = torch.full_like(sc.q, float("nan"))
    extend_attention_fwd(
        sc.q, None if from_pool else sc.k_new, None if from_pool else sc.v_new, out,
        sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
        sc.tensor(sc.prefix_lens), sc.tensor(sc.extend_lens), sc.extend_start_loc,
        max_extend_len=max(sc.extend_lens), scale=sc.scale, out_cache_loc=sc.out_cache_loc,
        sliding_window=window, k_scale=0.05, v_scale=0.02,
    )
    ref = extend_attention_ref(sc.q.float(), k_deq, v_deq, sc.req_to_token, sc.rows, sc.prefix_lens,
                               sc.extend_lens, scale=sc.scale, sliding_window=window)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL
