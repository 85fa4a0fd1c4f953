"""The FP8 GEMM kernels against torch: the W8A16 GEMV / small-M kernel (both tile kinds), the
per-token activation quantizer (bit-exact against torch's cast), and fp8_linear's dispatch on GPU."""

import pytest
import torch

from sglite.kernels import fp8_gemm
from sglite.kernels.fp8_gemm import quantize_rows, w8a16_matmul
from tests.kernels.pool import DEVICE, rel_err

FP8 = torch.float8_e4m3fn
# the interpreter's bf16 dots are wrong: fp16 activations there; bf16 on a GPU
ACT = torch.float16 if DEVICE == "cpu" else torch.bfloat16


def _weights(n, k, gen):
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]
    scale = w.abs().amax(1) / 448.0
    return (w / scale[:, None]).to(FP8).to(DEVICE), scale.float().to(DEVICE)


# the GPU's tile kinds, run in the interpreter too: one row, 16-row dots, the small layers' 64-row tile
_TILES = {"auto": None, "rows64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=1, num_stages=1)}


@pytest.mark.parametrize("m,n,k,bias,tiles", [(1, 48, 80, False, "auto"), (1, 16, 37, True, "auto"),
                                              (5, 40, 96, True, "auto"), (19, 32, 64, False, "auto"),
                                              (70, 72, 150, True, "rows64")])
def test_w8a16_matches_dequantized_matmul(m, n, k, bias, tiles):
    gen = torch.Generator().manual_seed(m * 100 + n)
    w, scale = _weights(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(ACT).to(DEVICE)
    b = torch.randn(n, generator=gen).to(ACT).to(DEVICE) if bias else None
    out = w8a16_matmul(x, w, scale, b, tiles=_TILES[tiles])
    ref = x.double() @ (w.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert rel_err(out, ref) < 2e-3  # fp32 accumulation, one rounding to the output dtype
    # the scales matter (a kernel ignoring them is far off)
    assert rel_err(out, x.double() @ w.double().T) > 0.5


def test_w8a16_tiles_agree():
    """BLOCK_M 1 (CUDA-core sums) and 16 (dots) compute the same function."""
    gen = torch.Generator().manual_seed(9)
    w, scale = _weights(64, 128, gen)
    x = torch.randn(1, 128, generator=gen).to(ACT).to(DEVICE)
    a = w8a16_matmul(x, w, scale, tiles=dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1))
    b = w8a16_matmul(x, w, scale, tiles=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=1, num_stages=1))
    assert rel_err(a, b) < 2e-3


@pytest.mark.parametrize("k", [128, 100, 32])
def test_w8a16_prefetch_same_sums(k):
    """The one-row kernel with the next tile loaded ahead (PREFETCH) sums the same products, also
    when K is not a multiple of the tile and when it is one tile (the prefetch then reads nothing)."""
    gen = torch.Generator().manual_seed(k)
    w, scale = _weights(48, k, gen)
    x = torch.randn(1, k, generator=gen).to(ACT).to(DEVICE)
    tiles = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    a = w8a16_matmul(x, w, scale, tiles=tiles)
    b = w8a16_matmul(x, w, scale, tiles={**tiles, "PREFETCH": True})
    ref = x.double() @ (w.double() * scale.double()[:, None]).T
    assert rel_err(b, ref) < 2e-3 and rel_err(a, b) < 1e-3


# fp8_gemv.py's one-row kernel: the plain loop, Triton's pipelined loop (STAGES), the next tile
# in registers (PREFETCH), 8- and 16-byte weight runs (VEC), the PDL launch (first tile peeled),
# a few programs looping over the channel blocks (PERSIST)
_GEMV_TILES = [dict(BLOCK_N=16, BLOCK_K=64, VEC=8), dict(BLOCK_N=8, BLOCK_K=64, VEC=16, STAGES=3),
               dict(BLOCK_N=4, BLOCK_K=32, VEC=8, PREFETCH=True), dict(BLOCK_N=16, BLOCK_K=128, VEC=16, PREFETCH=True),
               dict(BLOCK_N=8, BLOCK_K=64, VEC=8, PDL=True),  # PDL: launched so on a Hopper GPU only
               dict(BLOCK_N=4, BLOCK_K=32, VEC=8, PERSIST=1)]  # 3 "SMs" on the CPU: programs loop over blocks


@pytest.mark.parametrize("tiles", range(len(_GEMV_TILES)))
@pytest.mark.parametrize("m,n,k,bias", [(1, 48, 256, False), (1, 20, 96, True), (2, 33, 200, False), (1, 16, 16, True)])
def test_fp8_gemv_matches_dequantized_matmul(tiles, m, n, k, bias):
    """Every tile kind at K a multiple of the tile (EVEN_K), not one, and under one tile; N not a
    multiple of BLOCK_N; more than one row (each row its own programs); the output poisoned first."""
    from sglite.kernels.fp8_gemv import fp8_gemv

    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + tiles)
    w, scale = _weights(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(ACT).to(DEVICE)
    b = torch.randn(n, generator=gen).to(ACT).to(DEVICE) if bias else None
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
    fp8_gemv(x, w, scale, b, out, tiles={**_GEMV_TILES[tiles], "num_warps": 1 if DEVICE == "cpu" else 4, "num_stages": 1})
    ref = x.double() @ (w.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
    assert not out.isnan().any()
    # fp32 sums, one rounding to the output: fp16 on the CPU; bf16 on a GPU, whose rounding alone
    # is ~2.3e-3 rms (H200, 2026-12-03: 2.1e-3 to 2.9e-3 at these sizes); a lost K step is ~0.3
    tol = 2e-3 if x.dtype == torch.float16 else 6e-3
    assert rel_err(out, ref) < tol
    # through w8a16_matmul's dispatch (BLOCK_M 1 picks this kernel)
    via = w8a16_matmul(x, w, scale, b, tiles={**_GEMV_TILES[tiles], "BLOCK_M": 1, "num_warps": 1, "num_stages": 1})
    assert rel_err(via, ref) < tol


def test_quantize_rows_bit_exact():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 100, generator=gen) * torch.logspace(-3, 3, 6)[:, None]
    x[2, :4] = torch.tensor([0.0, -0.0, 1e-9, -1e-9])
    x = x.to(torch.bfloat16).to(DEVICE)
    xq, scale = quantize_rows(x)
    ref_scale = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    ref = (x.float() * (1.0 / scale)).clamp(-448, 448).to(FP8)  # the kernel multiplies by 1/scale
    assert torch.equal(xq.view(torch.uint8), ref.view(torch.uint8))
    assert rel_err(xq.float() * scale, x.float()) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="torch._scaled_mm needs a GPU with FP8")
@pytest.mark.parametrize("small_rule", [True, False])
@pytest.mark.parametrize("m", [1, 16, 65, 300, 2048])
def test_fp8_linear_every_path(m, small_rule, monkeypatch):
    if not small_rule:  # every layer past 16 rows through cuBLAS
        monkeypatch.setattr(fp8_gemm, "SMALL_LAYER_MAX_M", 0)
    gen = torch.Generator().manual_seed(m)
    w, scale = _weights(256, 512, gen)
    x = torch.randn(m, 512, generator=gen).to(torch.bfloat16).to(DEVICE)
    out = fp8_gemm.fp8_linear(x, w, scale)
    ref = x.double() @ (w.double() * scale.double()[:, None]).T
    path = fp8_gemm.fp8_path(m, 256, 512)
    assert (path == "triton") == (m <= 16 or (small_rule and m <= fp8_gemm.SMALL_LAYER_MAX_M))
    assert rel_err(out, ref) < (5e-3 if path == "triton" else 5e-2)  # per-token FP8 activations


def test_scale_rows_cols_in_place():
    gen = torch.Generator().manual_seed(4)
    out = (torch.randn(7, 150, generator=gen) * 1e4).to(torch.bfloat16).to(DEVICE)
    xs = torch.rand(7, 1, generator=gen).to(DEVICE) * 1e-3
    ws = torch.rand(150, generator=gen).to(DEVICE) * 1e-2
    ref = out.float() * (xs * ws[None, :])
    assert fp8_gemm.scale_rows_cols(out, xs, ws) is out
    # within one bf16 step (the interpreter truncates fp32 -> bf16; the GPU rounds to nearest)
    assert ((out.float() - ref).abs() <= ref.abs() * 2**-7).all()


def test_fp8_path_by_shape():
    assert fp8_gemm.fp8_path(1, 28672) == fp8_gemm.fp8_path(16, 28672) == "triton"
    assert fp8_gemm.fp8_path(64, 4096) == "rowwise" and fp8_gemm.fp8_path(512, 28672) == "rowwise"
    assert fp8_gemm.fp8_path(512, 6144) == "tensorwise" and fp8_gemm.fp8_path(4096, 6144) == "rowwise"
    # small layers (SmolLM2-135M: gate_up 3072 x 576) stay W8A16 up to SMALL_LAYER_MAX_M rows
    assert fp8_gemm.fp8_path(256, 3072, 576) == fp8_gemm.fp8_path(4096, 3072, 576) == "triton"
    assert fp8_gemm.fp8_path(4097, 3072, 576) == "rowwise"
    assert fp8_gemm.fp8_path(256, 4096, 4096) == "rowwise"  # Llama-3-8B's smallest (o) is not small


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="PDL early launch needs a CUDA GPU")
@pytest.mark.parametrize("one_row", [None, dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, VEC=8, num_warps=4, num_stages=1, PDL=True),
                                     dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, VEC=8, num_warps=4, num_stages=1, PERSIST=4)])
def test_w8a16_early_dependents_see_its_output(monkeypatch, one_row):
    """EARLY_DEPENDENTS: the PDL kernel after the one-row W8A16 kernel (rms_norm, as in the model)
    launches while the matmul runs and must still read its finished output: a CUDA graph of
    matmul -> norm -> matmul -> norm, fed fresh inputs each replay, equals the same chain run
    eagerly without the early launch."""
    from sglite.kernels.norm import rms_norm

    gen = torch.Generator().manual_seed(11)
    w1, s1 = _weights(8192, 4096, gen)  # long enough that the norm is resident before it ends
    w2, s2 = _weights(4096, 8192, gen)
    g1 = torch.rand(8192, generator=gen).to(torch.bfloat16).to(DEVICE)
    g2 = torch.rand(4096, generator=gen).to(torch.bfloat16).to(DEVICE)

    def chain(x):
        h = rms_norm(fp8_gemm.fp8_linear(x, w1, s1), g1, 1e-6)
        return rms_norm(fp8_gemm.fp8_linear(h, w2, s2), g2, 1e-6)

    if one_row is not None:  # fp8_gemv.py's kernel (PDL-launched, or looping programs) on both shapes
        monkeypatch.setattr(fp8_gemm, "TILE_OVERRIDES", {(1, 8192, 4096): one_row, (1, 4096, 8192): one_row})
    static_x = torch.randn(1, 4096, generator=gen).to(torch.bfloat16).to(DEVICE)
    monkeypatch.setattr(fp8_gemm, "EARLY_DEPENDENTS", True)
    chain(static_x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    for i in range(5):
        x = torch.randn(1, 4096, generator=gen).to(torch.bfloat16).to(DEVICE)
        static_x.copy_(x)
        graph.replay()
        monkeypatch.setattr(fp8_gemm, "EARLY_DEPENDENTS", False)
        ref = chain(x)
        monkeypatch.setattr(fp8_gemm, "EARLY_DEPENDENTS", True)
        torch.cuda.synchronize()
        assert torch.equal(static_out, ref), i
