"""One-row W8A16 linear (FP8 GEMV) for batch-1 decode: out[m, N] = x[m, K] @ (W[N, K] * scale).T,
one program per BLOCK_N output channels of one row of x, over all of K (no split-K).

The tile is [BLOCK_K // VEC, BLOCK_N, VEC], VEC contiguous weights per thread (8-byte loads), x a
[BLOCK_K // VEC, 1, VEC] row in the same layout (16-byte loads, no shared memory), each x value
reused for the program's BLOCK_N rows in registers. Each step's products are summed over the VEC
axis inside the thread before they reach the accumulator, which is VEC times smaller than the
tile (fp8_gemm's former one-row loop summed into a [BLOCK_N, BLOCK_K] fp32 accumulator: 115
registers at 8 x 1024, 68 here). K's groups are the tile's first axis so that triton 3.6 gives
W and x one layout (rows first, it put W's threads along N and converted every step's tile
through shared memory: 1.3-3.3x slower on the H200).

Launch: plain by default, letting its dependents launch at its start (EARLY, fp8_gemm's
EARLY_DEPENDENTS rule: it waits for nothing, so it starts after its predecessor has completed).
With tiles["PDL"] (fp8_gemm's default tiles) it is launched with PDL as gemv.py's kernel is: the
first weight tile is loaded before `wait_for_previous()` (no kernel of a forward writes weights),
x after it, and its dependents launch only after the wait (pdl.py's chained early launch), so
every kernel before a PDL kernel has completed when that one starts, the rule pdl.py rests on.

H200, Llama-3-8B shapes, 32 layers' weights back to back in a CUDA graph (bench/fp8_gemv_sweep.py,
2026-12-03): the PDL launch took 4-17% off each shape's best tile (qkv 9.11 -> 8.30 us, o 7.24 ->
5.99, gate_up 31.05 -> 29.68, down 16.95 -> 15.78); Triton's pipelined loads (STAGES 2-3,
cp.async through shared memory), the next tile in registers (PREFETCH) and programs looping over
channel blocks (PERSIST) were all slower than the plain loop, and the best 16-channel tile lost
to the best 8-channel one on every shape.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pdl import allow_dependents, pdl_options, wait_for_previous


@triton.jit
def _fp8_gemv_kernel(
    X, W, W_scale, Bias, Out,  # X [M, K] bf16/fp16/fp32; W [N, K] fp8; W_scale [N] fp32; Out [M, N]
    N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr = 1, USE_PDL: tl.constexpr = False,
    PERSIST: tl.constexpr = False, EARLY: tl.constexpr = False,
):
    """One program per BLOCK_N channels, or (PERSIST) a grid of a few programs an SM, each looping
    over the channel blocks pid, pid + programs, ... (no program launched per 8 rows)"""
    pid_m = tl.program_id(1).to(tl.int64)
    if PERSIST:
        for pid_n in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _channels(X, W, W_scale, Bias, Out, pid_n, pid_m, N, K, stride_xm, stride_wn, stride_om,
                      HAS_BIAS, BLOCK_N, BLOCK_K, VEC, PREFETCH, EVEN_K, STAGES, USE_PDL, EARLY)
    else:
        _channels(X, W, W_scale, Bias, Out, tl.program_id(0), pid_m, N, K, stride_xm, stride_wn, stride_om,
                  HAS_BIAS, BLOCK_N, BLOCK_K, VEC, PREFETCH, EVEN_K, STAGES, USE_PDL, EARLY)


@triton.jit
def _channels(X, W, W_scale, Bias, Out, pid_n, pid_m, N, K, stride_xm, stride_wn, stride_om,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
              PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
              EARLY: tl.constexpr):
    """Out[pid_m, BLOCK_N channels from pid_n * BLOCK_N] over all of K."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0).to(tl.int64)  # in-bounds rows: no N mask on the loads
    # the tile is [BLOCK_K // VEC, BLOCK_N, VEC]: K's groups first, so that the weights and x get
    # one layout (triton 3.6 orders a tie between the two non-contiguous axes by index; with the
    # rows first, W's threads went along N and each step's tile was converted through shared memory)
    offs_k = (tl.arange(0, BLOCK_K // VEC) * VEC)[:, None, None] + tl.arange(0, VEC)[None, None, :]
    w_ptrs = W + rows[None, :, None] * stride_wn + offs_k
    x_ptrs = X + pid_m * stride_xm + offs_k
    acc = tl.zeros([BLOCK_K // VEC, BLOCK_N], tl.float32)
    if USE_PDL:  # launched early: the first tile of weights (never written in a forward) before the wait
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=offs_k < K, other=0.0)
        wait_for_previous(USE_PDL)
        allow_dependents(EARLY)  # pdl.py's chained early launch: after the wait
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=offs_k < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
    else:
        allow_dependents(EARLY)  # a plain launch: its dependents may launch at its start
    if PREFETCH:  # (USE_PDL is not combined with it)
        if EVEN_K:
            w = tl.load(w_ptrs).to(tl.float16)
        else:
            w = tl.load(w_ptrs, mask=offs_k < K, other=0.0).to(tl.float16)
        for k0 in range(0, K, BLOCK_K):
            nxt = k0 + BLOCK_K
            # the next tile before this one's products (nothing on the last step)
            w_next = tl.load(w_ptrs + nxt, mask=nxt + offs_k < K, other=0.0)
            if EVEN_K:
                x = tl.load(x_ptrs + k0)
            else:
                x = tl.load(x_ptrs + k0, mask=k0 + offs_k < K, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
            w = w_next.to(tl.float16)  # carried widened: an fp8 tile carried by the loop was repacked byte by byte (PRMT)
    else:
        for k0 in tl.range(BLOCK_K if USE_PDL else 0, K, BLOCK_K, num_stages=STAGES):
            if EVEN_K:
                w = tl.load(w_ptrs + k0)
                x = tl.load(x_ptrs + k0)
            else:
                mask_k = k0 + offs_k < K
                w = tl.load(w_ptrs + k0, mask=mask_k, other=0.0)
                x = tl.load(x_ptrs + k0, mask=mask_k, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
    out = tl.sum(acc, axis=0) * tl.load(W_scale + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        out += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Out + pid_m * stride_om + offs_n, out.to(Out.dtype.element_ty), mask=mask_n)


def fp8_gemv(x, weight, weight_scale, bias, out, *, tiles: dict, early: bool = False) -> None:
    """Launch over x [M, K] (each row its own programs) into out [M, N]; tiles: BLOCK_N, BLOCK_K,
    VEC (8 if absent), PREFETCH, STAGES, PDL, PERSIST (programs an SM), num_warps, num_stages
    (fp8_gemm's table, where BLOCK_M is 1)."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = dict(tiles)
    cfg.pop("BLOCK_M", None)
    cfg.setdefault("VEC", 8)
    cfg.setdefault("PREFETCH", False)
    cfg.setdefault("STAGES", 1)
    pdl = pdl_options(x) if cfg.pop("PDL", False) and not cfg["PREFETCH"] else {}
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(triton.next_power_of_2(k), cfg["VEC"]))
    blocks = triton.cdiv(n, cfg["BLOCK_N"])
    per_sm = cfg.pop("PERSIST", 0)  # programs an SM; 0: one program per channel block
    grid = (min(blocks, per_sm * _num_sms(x.device)) if per_sm else blocks, m)
    _fp8_gemv_kernel[grid](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
        PERSIST=bool(per_sm), **pdl, **({"EARLY": True} if early else {}),
    )


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
