"""FP8 (e4m3) linear layers on the GPU: a Triton W8A16 GEMV / small-M GEMM for decode batches,
cuBLAS `torch._scaled_mm` with dynamic per-token activation scales for the rest, and the
rounding both the activation quantizer and the FP8 KV store use.

Weights are [N, K] float8_e4m3fn with one fp32 scale per output channel (per-tensor checkpoint
scales are expanded to channels on load): y = (x @ w.T) * w_scale.

Why two paths (H200, Llama-3-8B layer shapes, issue 19): at one row cuBLAS's FP8 path reads the
weights at 1.21x the bf16 speed, far from the 2x the halved bytes allow; a decode batch of a few
rows is bound by the weight bytes, so the Triton kernels (one row: fp8_gemv.py) load FP8 weights,
widen them in registers and multiply with the unquantized activations (no activation rounding). From
more rows the matrix units' FP8 rate pays: activations are quantized per token (one launch) and
cuBLAS multiplies FP8 x FP8, with both scale vectors or with unit scales and an epilogue launch
(fp8_path says which, from measurements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemv import fp8_gemv
from .pdl import allow_dependents, early_launch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
TRITON_MAX_M = 16  # rows up to which fp8_linear takes the Triton kernel for any shape (fp8_path)
# small layers (n * k weights at most SMALL_LAYER) take it up to SMALL_LAYER_MAX_M rows (fp8_path)
SMALL_LAYER = 1 << 22
SMALL_LAYER_MAX_M = 4096


@triton.jit
def round_to_e4m3(x):
    """fp32 x -> fp32 on the float8_e4m3fn grid: saturated to +-448, rounded to nearest even,
    so that the cast to fp8 that follows is exact. Done by hand because the Triton interpreter's
    own fp32 -> fp8 cast rounds wrongly at binade edges (-125 -> -64); on the GPU this gives the
    hardware cvt.rn.satfinite's results."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(x), 448.0)
    biased = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    biased = tl.maximum(biased, 121)  # below 2^-6: the subnormals' fixed spacing 2^-9
    # spacing 2^(e - 3) at unbiased exponent e; multiply by its exact reciprocal
    inv_step = ((257 - biased) << 23).to(tl.float32, bitcast=True)
    step = ((biased - 3) << 23).to(tl.float32, bitcast=True)
    y = a * inv_step
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)  # ties to even
    # the sign bit copied, not negated: compiled for sm90, the negation of a zero came out +0
    # (store_kv stored 0x00 for negatives that round to zero where torch's cast gives 0x80)
    mag = (r * step).to(tl.int32, bitcast=True)
    return (mag | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _quant_rows_kernel(X, Xq, Scale, K, stride_x, stride_xq, BLOCK_K: tl.constexpr):
    """One row per program: scale = amax / 448 (fp32), Xq = round(X / scale) in fp8."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
    tl.store(Scale + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(X + row * stride_x + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Xq + row * stride_xq + k0 + offs, round_to_e4m3(x * inv).to(Xq.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [M, 1]): dynamic per-token scales."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"quantize_rows: x must be [M, K] with a contiguous last axis, got {tuple(x.shape)}")
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block_k = min(triton.next_power_of_2(k), 2048 if x.is_cuda else 64)
        _quant_rows_kernel[(m,)](x, xq, scale, k, x.stride(0), xq.stride(0), BLOCK_K=block_k,
                                 num_warps=4 if x.is_cuda else 1)
    return xq, scale


@triton.jit
def _w8a16_kernel(
    X, W, W_scale, Bias, Out,  # X [M, K] bf16/fp16; W [N, K] fp8; W_scale [N] fp32; Out [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EARLY: tl.constexpr = False,
):
    """One program per BLOCK_N output channels x BLOCK_M rows, over all of K: tl.dot on weights
    widened to X's dtype (one row runs fp8_gemv.py's kernel instead)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    allow_dependents(EARLY)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    out = acc * tl.load(W_scale + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_gemm_tiles(m: int, n: int, k: int, *, device: torch.device) -> dict:
    """The tile table of the W8A16 kernels, by shape (BLOCK_M 1: fp8_gemv.py's one-row kernel).
    TILE_OVERRIDES[(m, n, k)] wins (benchmarks).
    One row, H200 (bench/fp8_gemv_sweep.py, 2026-12-03 17:55, Llama-3-8B shapes, 32 layers' weights
    back to back in a CUDA graph, us; fp8_gemm's old one-row loop in brackets): 8 channels a
    program, PDL-launched; 1024-wide K steps and 4 warps for qkv 8.30 (10.71) and gate_up 29.68
    (35.60), 2048 and 8 warps for the 4096-channel o 5.99 (7.28) and down 15.78 (17.54); the 128
    linears in model order 1.867 ms (0.88 of copy; the old loop 2.246, cuBLAS bf16 3.853).
    2-64 rows (bench/fp8.py part g, 2026-12-02): 16 x 32 x 256 won 15 of 20 shapes."""
    if (m, n, k) in TILE_OVERRIDES:
        return dict(TILE_OVERRIDES[(m, n, k)])
    if device.type != "cuda":  # interpreter: small tiles so tiny tests take several K steps
        if m == 1:
            return dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, VEC=8, num_warps=1, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    if m == 1:
        # one thread per 8 weights of a step (BLOCK_K / 8 threads); K steps under 1024 for short rows
        bk = 2048 if n <= 4096 and k >= 2048 else min(1024, max(256, triton.next_power_of_2(k)))
        return dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=bk, VEC=8, num_warps=bk // 256, num_stages=1, PDL=True)
    if m <= 64:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    # the small layers' prefill rows (fp8_path): larger tiles, fewer programs re-reading W
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


TILE_OVERRIDES: dict[tuple[int, int, int], dict] = {}
# A plain-launched W8A16 kernel (the small-M one, a one-row tile without PDL) starts once
# everything before it has completed (the rule pdl.py's safety rests on) but lets its dependents
# launch at its start: the norm, rotary and activation kernels after each linear (PDL launches)
# are then resident and waiting when it ends, as they are after cuBLAS's kernels in bf16. The
# PDL-launched one-row kernel lets them launch after its wait instead (fp8_gemv.py). H200 batch-1
# (bench/fp8.py part a, Llama-3-8B shape, 2026-12-03, the old one-row loop): the replay outside
# the 128 linears 0.667 ms before (bf16: 0.455) -> 0.54 ms; 3.018 vs 3.184 ms/token (on / off).
EARLY_DEPENDENTS = True


def w8a16_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, *, tiles: dict | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ (weight [N, K] fp8 * weight_scale [N] fp32).T -> [M, N] in x's dtype."""
    _check(x, weight, weight_scale, bias)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = dict(tiles or fp8_gemm_tiles(m, n, k, device=x.device))
    bm, bn = cfg.pop("BLOCK_M"), cfg["BLOCK_N"]
    if bm == 1:  # fp8_gemv.py's kernel, each row of x its own programs
        fp8_gemv(x, weight, weight_scale, bias, out, tiles=cfg, early=EARLY_DEPENDENTS and early_launch(x))
        return out
    early = {"EARLY": True} if EARLY_DEPENDENTS and early_launch(x) else {}
    _w8a16_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, **cfg, **early,
    )
    return out


def fp8_path(m: int, n: int, k: int | None = None) -> str:
    """Which path runs x [m, K] @ W [n, K].T, from the H200 sweep at Llama-3-8B shapes
    (bench/fp8.py part g, 2026-12-02 18:52, us: bf16 F.linear / FP8):
    - "triton" (W8A16) up to 16 rows (qkv M=16: 22.6 / 20.1; gate_up M=16: 70.2 / 48.6); from 32
      rows it loses to cuBLAS (qkv M=64: 40.5 vs rowwise 22.3);
    - "rowwise" (per-token x per-channel scales, fast accumulation: 5-10% faster than without,
      same error) everywhere else (M=4096: qkv 262.4 / 178.0, gate_up 1340.6 / 734.6, down
      596.9 / 453.1; M=512: o 28.4 / 24.4, gate_up 175.1 / 103.6, down 84.9 / 61.8);
    - "tensorwise" (unit-scale GEMM, the scales in one epilogue launch) for qkv-wide n at 257-1023
      rows, where rowwise picked a slow kernel (qkv M=512: rowwise 71.6-76.7, fp8_linear's
      tensorwise 39.9, bf16 39.0);
    - "triton" also for a small layer (n * k <= SMALL_LAYER, e.g. SmolLM2-135M's, 0.5-1.8M weights)
      up to SMALL_LAYER_MAX_M rows: there the product is too small for FP8's matrix rate to pay
      for the activation quantizer's extra pass and launch, and the rows keep their bf16
      activations. H200 part s (2026-12-03, us per layer, qkv + o + gate_up + down, W8A16 /
      per-token FP8 + cuBLAS): M=256 92 / 192, 1024 96 / 195, 2048 101 / 186, 4096 148 / 165
      (do_bench); eager wall time per call 2048: 172 / 261, 4096: 156 / 243. SmolLM2 on the GPU,
      2k tokens in 256-row chunks: KL vs bf16 0.0183 W8A16, 0.0303 with FP8 activations."""
    if m <= TRITON_MAX_M:
        return "triton"
    if k is not None and n * k <= SMALL_LAYER and m <= SMALL_LAYER_MAX_M:
        return "triton"
    if 4096 < n <= 8192 and 256 < m < 1024:
        return "tensorwise"
    return "rowwise"


@triton.jit
def _scale_out_kernel(Out, X_scale, W_scale, N, stride_om, BLOCK_N: tl.constexpr):
    """Out[m, n] *= X_scale[m] * W_scale[n], in fp32, in place."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    ptrs = Out + row * stride_om + offs
    o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(X_scale + row) * tl.load(W_scale + offs, mask=mask, other=0.0)
    tl.store(ptrs, (o * scale).to(Out.dtype.element_ty), mask=mask)


def scale_rows_cols(out: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """out [M, N] *= x_scale [M, 1] * w_scale [N] in place (fp32 math, one rounding)."""
    m, n = out.shape
    if m:
        block_n = min(triton.next_power_of_2(n), 1024 if out.is_cuda else 64)
        _scale_out_kernel[(m, triton.cdiv(n, block_n))](out, x_scale, w_scale, n, out.stride(0),
                                                        BLOCK_N=block_n, num_warps=4 if out.is_cuda else 1)
    return out


_UNIT: dict[torch.device, torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """A cached fp32 1.0 (not cached when first asked for inside a CUDA-graph capture, whose
    private pool the tensor would live in)."""
    one = _UNIT.get(device)
    if one is None:
        one = torch.ones((), dtype=torch.float32, device=device)
        if not torch.cuda.is_current_stream_capturing():
            _UNIT[device] = one
    return one


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype on CUDA, by fp8_path: the Triton W8A16 kernel, or
    per-token FP8 activations through torch._scaled_mm (rowwise scales, or unit scales and the
    scales applied after)."""
    path = fp8_path(x.shape[0], weight.shape[0], weight.shape[1])
    if path == "triton":
        return w8a16_matmul(x, weight, weight_scale, bias)
    xq, x_scale = quantize_rows(x)
    if path == "rowwise":
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                               out_dtype=x.dtype, use_fast_accum=True)
    else:
        one = _unit_scale(x.device)
        out = scale_rows_cols(torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=x.dtype),
                              x_scale, weight_scale)
    return out if bias is None else out + bias


def _check(x, weight, weight_scale, bias) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp8 matmul: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight_scale.dtype != torch.float32:
        raise ValueError(f"fp8 matmul: weight must be float8_e4m3fn with fp32 scales, got "
                         f"{weight.dtype} / {weight_scale.dtype}")
    if weight_scale.shape != (weight.shape[0],) or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"fp8 matmul: one scale (and bias) per output channel ({weight.shape[0]}) needed")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("fp8 matmul: x and weight need a contiguous last (K) axis")
