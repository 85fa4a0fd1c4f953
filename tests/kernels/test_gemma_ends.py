"""The launches outside Gemma's layers (interpreted on a CPU) against the torch code they replace,
on fresh random inputs with the outputs poisoned: the soft-cap with its fp32 cast
(sglite.kernels.softcap), the scaled embedding with the rope's cos / sin (sglite.kernels.embed_rope),
and the one-row GEMVs with two weight chunks in flight (gemv.DEPTH 2): the same bits as one."""

import pytest
import torch

from sglite.kernels import gemv as gemv_mod
from sglite.kernels.embed_rope import embed_rope
from sglite.kernels.gemv import gemv
from sglite.kernels.gemv_pairs import gemv_glu
from sglite.kernels.softcap import softcap_logits, softcap_logits_ref
from tests.kernels.pool import DEVICE


@pytest.mark.parametrize("cap", [30.0, None])
def test_softcap_logits_matches_torch(cap):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 1500, generator=g) * 40.0).to(DEVICE, torch.bfloat16)[:2]  # rows of a larger buffer
    out = softcap_logits(logits, cap)
    ref = softcap_logits_ref(logits, cap)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    if cap is None:
        assert torch.equal(out, ref)
    else:  # the interpreter's tanh is e^2t based: a few fp32 ulps from torch's
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
        assert out.abs().max() <= cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_rope_matches_torch(dtype):
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(50, 72, generator=g).to(DEVICE, dtype)  # hidden not a power of 2
    ids = torch.tensor([3, 49, 0, 3], device=DEVICE)
    positions = torch.tensor([0, 7, 1000, 8191], device=DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    scale = torch.tensor(72**0.5, dtype=dtype)
    x, cos, sin = embed_rope(ids, weight, scale.item(), positions, inv.to(DEVICE))
    ref = torch.nn.functional.embedding(ids, weight) * scale
    if dtype == torch.float32:
        assert torch.equal(x, ref)
    else:  # the interpreter rounds fp32 -> bf16 toward zero (a GPU to nearest): one bf16 step
        torch.testing.assert_close(x.float(), ref.float(), atol=0, rtol=2**-7)
    freqs = positions[:, None] * inv.to(DEVICE)[None, :]
    torch.testing.assert_close(cos, freqs.cos(), atol=2e-6, rtol=0)
    torch.testing.assert_close(sin, freqs.sin(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("k", [100, 64])  # K not a multiple of the chunk; two chunks exactly
def test_gemv_depths_are_bit_equal(monkeypatch, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(12, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16)
    cfg = dict(BLOCK_N=2, BLOCK_K=32, num_warps=1, num_stages=1)
    one = gemv(x, w, config=cfg)
    glu_one = gemv_glu(x, w, gelu=True, block_k=32)
    for depth in (2, 0):  # two chunks in flight; none before the wait
        monkeypatch.setattr(gemv_mod, "DEPTH", depth)
        assert gemv_mod.depth(k, 32) == depth
        assert torch.equal(gemv(x, w, config=cfg), one)
        assert torch.equal(gemv_glu(x, w, gelu=True, block_k=32), glu_one)
