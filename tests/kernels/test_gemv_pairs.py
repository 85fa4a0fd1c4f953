"""The paired-row GEMVs (sglite.kernels.gemv_pairs; interpreted on a CPU) against F.linear in
float64 and the torch references, on fresh random inputs, outputs and pool buffers poisoned
first: qkv with the rotary epilogue and KV store (only the token's slot may change in the pools),
gate_up with the GLU epilogue; K not a multiple of the chunk; fp32 and bf16; and in bf16 the same
bits as the two launches each replaces (gemv, then the rotary kernel with its store / the
activation kernel)."""

import pytest
import torch
import torch.nn.functional as F

from sglite.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul, silu_and_mul_ref
from sglite.kernels.gemv import gemv
from sglite.kernels.gemv_pairs import gemv_glu, gemv_rope
from sglite.kernels.rotary import apply_rotary_qk, apply_rotary_ref
from tests.kernels.pool import DEVICE, rel_err


def _inputs(dtype, heads, kv_heads, head_dim, k, seed):
    g = torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    angles = torch.rand(1, head_dim // 2, generator=g) * 20.0
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    pools = [torch.full((9, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    loc = torch.tensor([6], device=DEVICE)
    return x, w, cos, sin, pools, loc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,k,block_k", [
    (4, 2, 16, 64, 32),   # K = 2 chunks
    (2, 1, 8, 100, 32),   # K not a multiple of the chunk
    (3, 3, 32, 24, 64),   # one chunk wider than K, MHA
])
def test_gemv_rope_matches_reference(dtype, heads, kv_heads, head_dim, k, block_k):
    x, w, cos, sin, (kb, vb), loc = _inputs(dtype, heads, kv_heads, head_dim, k, seed=heads * 100 + k)
    out = gemv_rope(x, w, cos, sin, kb, vb, loc, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                    block_k=block_k)
    ref = F.linear(x.double(), w.double())[0]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, kk, v = ref.split([q_size, kv_size, kv_size])
    rot = lambda t, h: apply_rotary_ref(t.view(1, h, head_dim), cos.double(), sin.double())  # noqa: E731
    ref_q, ref_k, ref_v = rot(q, heads), rot(kk, kv_heads), v.view(1, kv_heads, head_dim)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    got = out[0].split([q_size, kv_size, kv_size])
    assert torch.isfinite(out).all()
    for g_, r_ in zip(got, (ref_q, ref_k, ref_v)):
        assert rel_err(g_.view_as(r_), r_) < tol
    assert rel_err(kb[6], ref_k[0]) < tol and rel_err(vb[6], ref_v[0]) < tol
    assert torch.equal(kb[6], got[1].view(kv_heads, head_dim)) and torch.equal(vb[6], got[2].view(kv_heads, head_dim))
    others = torch.cat([kb[:6], kb[7:], vb[:6], vb[7:]])
    assert torch.isnan(others).all()  # nothing but the token's slot was written


def test_gemv_rope_same_bits_as_gemv_then_rotary():
    heads, kv_heads, head_dim, k = 4, 2, 16, 96
    x, w, cos, sin, (kb, vb), loc = _inputs(torch.bfloat16, heads, kv_heads, head_dim, k, seed=7)
    out = gemv_rope(x, w, cos, sin, kb, vb, loc, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                    block_k=32)
    kb2, vb2 = torch.zeros_like(kb), torch.zeros_like(vb)
    two = gemv(x, w, config=dict(BLOCK_N=2, BLOCK_K=32, num_warps=1, num_stages=1))
    q2, k2, v2 = two.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    apply_rotary_qk(q2.view(1, heads, head_dim), k2.view(1, kv_heads, head_dim), cos, sin,
                    v=v2.view(1, kv_heads, head_dim), k_buffer=kb2, v_buffer=vb2, loc=loc)
    assert torch.equal(out, two)
    assert torch.equal(kb[6], kb2[6]) and torch.equal(vb[6], vb2[6])


def test_gemv_rope_shape_errors():
    x, w, cos, sin, (kb, vb), loc = _inputs(torch.float32, 2, 1, 8, 16, seed=1)
    with pytest.raises(ValueError, match="rows"):
        gemv_rope(x, w, cos, sin, kb, vb, loc, num_heads=3, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="cos"):
        gemv_rope(x, w, cos[:, :2], sin, kb, vb, loc, num_heads=2, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="pool buffer"):
        gemv_rope(x, w, cos, sin, kb.bfloat16(), vb, loc, num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("inter,k,block_k", [(24, 64, 32), (7, 100, 32), (5, 16, 64)])
def test_gemv_glu_matches_reference(dtype, gelu, inter, k, block_k):
    g = torch.Generator().manual_seed(inter * 100 + k + gelu)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(2 * inter, k, generator=g) * 2 / k**0.5).to(DEVICE, dtype)
    out = gemv_glu(x, w, gelu=gelu, block_k=block_k)
    ref = (gelu_tanh_and_mul_ref if gelu else silu_and_mul_ref)(F.linear(x.double(), w.double()))
    assert out.shape == (1, inter) and torch.isfinite(out).all()
    # bf16: gate, up, act and the product each rounded (as the unfused ops): up to ~2 ulp
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("gelu", [True, False])
def test_gemv_glu_same_bits_as_gemv_then_activation(gelu):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 80, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(2 * 12, 80, generator=g) * 0.3).to(DEVICE, torch.bfloat16)
    out = gemv_glu(x, w, gelu=gelu, block_k=32)
    two = gemv(x, w, config=dict(BLOCK_N=2, BLOCK_K=32, num_warps=1, num_stages=1))
    assert torch.equal(out, (gelu_tanh_and_mul if gelu else silu_and_mul)(two))


def test_gemv_glu_shape_errors():
    with pytest.raises(ValueError):
        gemv_glu(torch.randn(1, 8), torch.randn(5, 8), gelu=True)
    with pytest.raises(ValueError):
        gemv_glu(torch.randn(2, 8), torch.randn(4, 8), gelu=True)


def _sandwich_ref(o, res, g1, g2, eps1, eps2):
    """float64: residual + norm1(o), then norm2 of it (Gemma's norms with g = 1 + w)."""
    def norm(v, g, eps):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g
    new_res = res.double() + norm(o.double(), g1.double(), eps1)
    return norm(new_res, g2.double(), eps2), new_res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["rope", "glu"])
@pytest.mark.parametrize("k,block_k", [(96, 32), (100, 32)])
def test_norm_prologue_matches_reference(dtype, which, k, block_k):
    """norm=: the projection of norm2(residual + norm1(x)) and the new residual stream, written
    to a buffer of its own (the residual given is left as it was)."""
    heads, kv_heads, head_dim = 2, 1, 16
    x, w, cos, sin, (kb, vb), loc = _inputs(dtype, heads, kv_heads, head_dim, k, seed=k + 11)
    g = torch.Generator().manual_seed(k)
    x = x * 3
    res = (torch.randn(1, k, generator=g) * 5).to(DEVICE, dtype)
    res_before = res.clone()
    g1, g2 = [(1 + 0.3 * torch.randn(k, generator=g)).to(DEVICE) for _ in range(2)]
    normed, ref_res = _sandwich_ref(x, res, g1, g2, 1e-6, 1e-5)
    norm = (res, g1, g2, 1e-6, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    if which == "rope":
        out, new_res = gemv_rope(x, w, cos, sin, kb, vb, loc, num_heads=heads, num_kv_heads=kv_heads,
                                 head_dim=head_dim, block_k=block_k, norm=norm)
        proj = F.linear(normed, w.double())[0]
        q, kk, v = proj.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        ref = torch.cat([apply_rotary_ref(q.view(1, heads, head_dim), cos.double(), sin.double()).reshape(-1),
                         apply_rotary_ref(kk.view(1, kv_heads, head_dim), cos.double(), sin.double()).reshape(-1),
                         v])[None]
        assert rel_err(vb[6], v.view(kv_heads, head_dim)) < tol
    else:
        w = w[: 2 * (w.shape[0] // 2)]
        out, new_res = gemv_glu(x, w, gelu=True, block_k=block_k, norm=norm)
        ref = gelu_tanh_and_mul_ref(F.linear(normed, w.double()))
    assert torch.isfinite(out).all() and torch.isfinite(new_res).all()
    assert rel_err(out, ref) < tol
    assert rel_err(new_res, ref_res) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(res, res_before) and new_res.data_ptr() != res.data_ptr()


def test_norm_prologue_needs_a_program_per_residual_chunk():
    x, w, cos, sin, (kb, vb), loc = _inputs(torch.float32, 1, 1, 4, 512, seed=2)  # 6 programs, 16 chunks
    norm = (torch.randn(1, 512), torch.ones(512), torch.ones(512), 1e-6, 1e-6)
    with pytest.raises(ValueError, match="residual chunks"):
        gemv_rope(x, w, cos, sin, kb, vb, loc, num_heads=1, num_kv_heads=1, head_dim=4, block_k=32, norm=norm)
