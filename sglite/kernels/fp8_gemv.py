"""One-row W8A16 linear (FP8 GEMV) for batch-1 decode: out[m, N] = x[m, K] @ (W[N, K] * scale).T,
one program per BLOCK_N output channels of one row of x, over all of K (no split-K).

Why its own kernel (issue 19): fp8_gemm's one-row loop sums into a [BLOCK_N, BLOCK_K] fp32
accumulator, four bytes of registers for each byte of weights loaded, which caps the bytes a
program can have in flight (8 x 1024 tiles, 115 registers; H200: 0.75-0.79 of copy bandwidth over
the 8B shape's 128 decoder linears where cuBLAS's bf16 GEMV reads at 0.88-0.94). Here the tile is
[BLOCK_N, BLOCK_K // VEC, VEC] with VEC contiguous weights per thread, and each step's products
are summed over the VEC axis inside the thread before they reach the accumulator, which is VEC
times smaller: the registers go to larger tiles and, with PREFETCH, to the next tile's weights
loaded before this one's products. x is a [1, BLOCK_K // VEC, VEC] row in the weights' layout
(no shared memory), each x value reused for the program's BLOCK_N rows in registers.

A plain launch that may let its dependents launch at its start (EARLY, fp8_gemm's
EARLY_DEPENDENTS rule: it waits for nothing, so it starts after its predecessor has completed).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import allow_dependents


@triton.jit
def _fp8_gemv_kernel(
    X, W, W_scale, Bias, Out,  # X [M, K] bf16/fp16/fp32; W [N, K] fp8; W_scale [N] fp32; Out [M, N]
    N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr = 1, EARLY: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0).to(tl.int64)  # in-bounds rows: no N mask on the loads
    offs_k = (tl.arange(0, BLOCK_K // VEC) * VEC)[:, None] + tl.arange(0, VEC)[None, :]  # [BK/VEC, VEC]
    w_ptrs = W + rows[:, None, None] * stride_wn + offs_k[None, :, :]
    x_ptrs = X + pid_m * stride_xm + offs_k[None, :, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], tl.float32)
    allow_dependents(EARLY)
    if PREFETCH:
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(offs_k < K)[None, :, :], other=0.0)
        for k0 in range(0, K, BLOCK_K):
            nxt = k0 + BLOCK_K
            # the next tile before this one's products (nothing on the last step)
            w_next = tl.load(w_ptrs + nxt, mask=(nxt + offs_k < K)[None, :, :], other=0.0)
            if EVEN_K:
                x = tl.load(x_ptrs + k0)
            else:
                x = tl.load(x_ptrs + k0, mask=(k0 + offs_k < K)[None, :, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
            w = w_next
    else:
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            if EVEN_K:
                w = tl.load(w_ptrs + k0)
                x = tl.load(x_ptrs + k0)
            else:
                mask_k = (k0 + offs_k < K)[None, :, :]
                w = tl.load(w_ptrs + k0, mask=mask_k, other=0.0)
                x = tl.load(x_ptrs + k0, mask=mask_k, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
    out = tl.sum(acc, axis=1) * tl.load(W_scale + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        out += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Out + pid_m * stride_om + offs_n, out.to(Out.dtype.element_ty), mask=mask_n)


def fp8_gemv(x, weight, weight_scale, bias, out, *, tiles: dict, early: bool = False) -> None:
    """Launch over x [M, K] (each row its own programs) into out [M, N]; tiles: BLOCK_N, BLOCK_K,
    VEC, PREFETCH, num_warps, num_stages (fp8_gemm's table, BLOCK_M == 1 with VEC set)."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = dict(tiles)
    cfg.pop("BLOCK_M", None)
    cfg.setdefault("PREFETCH", False)
    cfg.setdefault("STAGES", 1)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(triton.next_power_of_2(k), cfg["VEC"]))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), m)
    _fp8_gemv_kernel[grid](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
        **({"EARLY": True} if early else {}),
    )
