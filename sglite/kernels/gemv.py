"""One-row bf16/fp16 linear (GEMV) for batch-1 decode: out[1, N] = x[1, K] @ W[N, K]^T.

A batch-1 decode step is the weights streamed once; cuBLAS picks split-K kernels for the narrow
projections (o_proj, down_proj: a second reduce launch each) and reaches 2.4-3.6 TB/s on 29-103 MB
matrices (Gemma-2-9B on an H200, bench/decode_floor.py --gemv-sweep). Here each program owns
BLOCK_N whole rows (no split-K, no second launch), streams them in BLOCK_K chunks with the next
chunk's load issued before the current one's FMAs, accumulates elementwise in fp32 and reduces
once after the loop. Launched with PDL: the weights are not written by any kernel of the forward,
so each program loads its first chunk before `wait_for_previous()` (pdl.py's rule: only what was
written before the forward began), while the norm or activation before it still runs; x is read
after the wait. With `early=True` (pdl.py's chained early launch) it then lets its own dependent
launch.

Which layers run it: those whose model sets `one_row_gemv` on them (Gemma's four decoder
projections; layers/linear.py dispatches), for one-row inputs, while ENABLED (`SGLITE_GEMV=0`
turns it off; read at import, or set `gemv.ENABLED`). Measured in the whole step (H200,
2026-12-03): with the chained early launch, Gemma-2-9B's batch-1 graph replay 5.93 -> 5.34 ms.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import allow_dependents, chain_options, pdl_options, wait_for_previous

ENABLED = os.environ.get("SGLITE_GEMV", "1") != "0"
# each program asks L2 for the rest of its rows before its PDL wait (prefetch_rows), not only its
# first chunk, so that the weights stream while the kernel before (attention, a norm) runs.
# Timed on an H200 (2026-12-04, bench/decode_floor.py --variants, same call): Gemma-2-9B's
# batch-1 graph replay 5.31 -> 6.05 ms (+14%; same logits), so off: the step is bound by DRAM
# already, and rows asked for early take bandwidth from the kernel still running (and L2 lines
# they may lose before use). Asking L2 for only the next 1, 2 or 3 chunks (about what DRAM brings
# while a norm runs) was slower too: 5.12 -> 5.33 / 5.63 / 5.72 ms (2026-12-04, same call; not kept).
# SGLITE_GEMV_PREFETCH=1 (or PREFETCH, read at call time) turns it on
PREFETCH = os.environ.get("SGLITE_GEMV_PREFETCH", "0") == "1"
# weight chunks each program keeps in flight (stream_rows' DEPTH), also the pair GEMVs'
# (gemv_pairs.py): 1, the first chunk loaded before the PDL wait; 2, the first two, so that more
# weights arrive while the kernel before (attention, a norm) ends; 0, none before the wait (one
# in flight after it). SGLITE_GEMV_DEPTH (or DEPTH, read at call time; ignored with PREFETCH).
# H200 2026-12-04 (bench/decode_floor.py --variants, same call): DEPTH 2 makes Gemma-2-9B's
# batch-1 graph replay 5.29 -> 5.77 ms (same logits), as the L2 prefetch below did
DEPTH = int(os.environ.get("SGLITE_GEMV_DEPTH", "1"))
# (n, k) -> tiles, consulted before gemv_config's default (bench/decode_floor.py fills it from
# the same call's --gemv-sweep before it times the GEMV variants)
TILES: dict[tuple[int, int], dict] = {}


@triton.jit
def prefetch_rows(W, rows, K, stride_wn, BLOCK_K: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for the rows' 128-byte lines past their first BLOCK_K columns (16-bit weights; LINES
    a power of 2 >= the lines of a row; those past K fall back on the first line): issued before
    the PDL wait, so the weights stream while the kernel before still runs."""
    cols = BLOCK_K + tl.arange(0, LINES) * 64
    cols = tl.where(cols < K, cols, 0)
    ptrs = W + rows[:, None] * stride_wn + cols[None, :]
    tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def stream_rows(X, W, rows, K, stride_wn, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr,
                PREFETCH: tl.constexpr = 0, DEPTH: tl.constexpr = 1):
    """x [K] . W[rows] in fp32 ([BLOCK_N] for in-bounds rows [BLOCK_N]): W's first chunk loaded
    before the PDL wait (with PREFETCH = prefetch_rows' LINES, the rest of the rows asked of L2
    too), x after it; with EARLY the next kernel launches right after the wait. DEPTH 2: the
    first two chunks before the wait and two in flight in the loop (same products, same order).
    Also the paired GEMVs with epilogues (gemv_pairs.py)."""
    if DEPTH == 2:
        acc = _stream_rows_2(X, W, rows, K, stride_wn, BLOCK_K, USE_PDL, EARLY)
    else:
        acc = _stream_rows_1(X, W, rows, K, stride_wn, BLOCK_K, USE_PDL, EARLY, PREFETCH, DEPTH == 1)
    return acc


@triton.jit
def _stream_rows_1(X, W, rows, K, stride_wn, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr,
                   PREFETCH: tl.constexpr, PRE: tl.constexpr = True):
    """stream_rows with one weight chunk in flight (DEPTH 1; DEPTH 0: PRE False, the first chunk
    loaded after the wait)."""
    offs_k = tl.arange(0, BLOCK_K)
    # runs of 8 along K; x loaded as a [BLOCK_N, BLOCK_K] tile (each row the same, L1 hits) so
    # that its 16-byte loads take W's layout: a [1, BLOCK_K] x went through shared memory with
    # two barriers per step (sm90 SASS)
    offs_k8 = tl.max_contiguous(offs_k, 8)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k8[None, :]
    x_ptrs = X + (rows * 0)[:, None] + offs_k8[None, :]
    # weights only before the wait: nothing in the forward writes them (pdl.py)
    if PRE:
        w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0)
    if PREFETCH > 0:
        prefetch_rows(W, rows, K, stride_wn, BLOCK_K, PREFETCH)
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)
    if not PRE:
        w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0)
    acc = tl.zeros(w.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0)
        # the next chunk before this one's products (all masked off on the last step)
        w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=(k0 + BLOCK_K + offs_k < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
        w = w_next
    return tl.sum(acc, axis=1)


@triton.jit
def _stream_rows_2(X, W, rows, K, stride_wn, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr):
    """stream_rows with two weight chunks in flight (DEPTH 2)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_k8 = tl.max_contiguous(offs_k, 8)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k8[None, :]
    x_ptrs = X + (rows * 0)[:, None] + offs_k8[None, :]
    w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0)
    w1 = tl.load(w_ptrs + BLOCK_K, mask=(BLOCK_K + offs_k < K)[None, :], other=0.0)
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)
    acc = tl.zeros(w.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0)
        w2 = tl.load(w_ptrs + (k0 + 2 * BLOCK_K), mask=(k0 + 2 * BLOCK_K + offs_k < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
        w = w1
        w1 = w2
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_kernel(
    X, W, Out, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,  # pdl.chain_options: the next kernel launches after the wait
    PREFETCH: tl.constexpr = 0,  # prefetch_lines()
    DEPTH: tl.constexpr = 1,  # stream_rows' weight chunks in flight (DEPTH below)
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0).to(tl.int64)  # in-bounds rows; the store drops the extra
    out = stream_rows(X, W, rows, K, stride_wn, BLOCK_K, USE_PDL, EARLY, PREFETCH, DEPTH)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=mask_n)


def gemv_config(n: int, k: int) -> dict:
    """Tiles for W [n, k] (TILES overrides per shape): 2 rows a program, 512-column chunks, 4
    warps; 2048-column chunks and 8 warps for long rows (k >= 8192). The best of six tiles on each
    Gemma-2-9B projection alone (H200, bench/decode_floor.py --gemv-sweep, 2026-12-03; cuBLAS in
    brackets): qkv 16.9 us (16.7), o 9.5 (12.4 with its split-K reduce), gate_up 50.1 (49.8), down
    27.2 (28.8). 4x512 (the previous default) was 0.5-2.7 us slower on each."""
    if (n, k) in TILES:
        return dict(TILES[(n, k)])
    if k >= 8192:
        return dict(BLOCK_N=2, BLOCK_K=2048, num_warps=8, num_stages=1)
    return dict(BLOCK_N=2, BLOCK_K=512, num_warps=4, num_stages=1)


def prefetch_lines(x: torch.Tensor, k: int, block_k: int) -> int:
    """The PREFETCH constexpr for rows of k 16-bit weights: prefetch_rows' LINES, 0 for none (off,
    or no GPU: the interpreter runs no inline asm)."""
    if not (PREFETCH and x.is_cuda and k > block_k):
        return 0
    return triton.next_power_of_2(triton.cdiv(k - block_k, 64))


def depth(k: int, block_k: int) -> int:
    """The DEPTH constexpr for rows of k columns in block_k chunks (2 only for rows of more than
    one chunk; 1 with PREFETCH)."""
    if PREFETCH or DEPTH not in (0, 2):
        return 1
    return 0 if DEPTH == 0 else (2 if k > block_k else 1)


def use_gemv(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether gemv() serves F.linear(x, weight, bias): one row, CUDA, 16-bit, no bias."""
    return (ENABLED and bias is None and x.is_cuda and x.dim() == 2 and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.stride(-1) == 1 and x.stride(-1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, config: dict | None = None,
         out: torch.Tensor | None = None, early: bool = False) -> torch.Tensor:
    """x [1, K], weight [N, K] (rows contiguous) -> [1, N] in x's dtype. early: the next kernel
    may launch once this one's programs have waited (pdl.py; also on under pdl.CHAIN)."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} (need [1, K], [N, K])")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("gemv: x and weight need a contiguous last axis")
    n, k = weight.shape
    cfg = dict(config or gemv_config(n, k))
    if not x.is_cuda:  # interpreter: few programs
        cfg.update(num_warps=1, num_stages=1)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device) if out is None else out
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, weight, out, n, k, weight.stride(0), **cfg, **pdl_options(x),
        **chain_options(x, early), PREFETCH=prefetch_lines(x, k, cfg["BLOCK_K"]), DEPTH=depth(k, cfg["BLOCK_K"]))
    return out
