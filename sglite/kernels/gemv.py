"""One-row bf16/fp16 linear (GEMV) for batch-1 decode: out[1, N] = x[1, K] @ W[N, K]^T.

A batch-1 decode step is the weights streamed once; cuBLAS picks split-K kernels for the narrow
projections (o_proj, down_proj: a second reduce launch each) and reaches 2.5-3.5 TB/s on 29-103 MB
matrices (Gemma-2-9B on an H200, bench/decode_floor.py --profile, 2026-12-02) against ~4.35 TB/s
for the 1.8 GB LM head. Here each program owns BLOCK_N whole rows (no split-K, no second launch),
streams them in BLOCK_K chunks with the next chunk's load issued before the current one's FMAs,
accumulates elementwise in fp32 and reduces once after the loop. Launched with PDL: the weights
are not written by any kernel of the forward, so each program loads its first chunk before
`wait_for_previous()` (pdl.py's rule: only what was written before the forward began), while the
norm or activation before it still runs; x is read after the wait. It never lets its own
dependents launch early.

`gemv_config(n, k)` is the tile table. Off unless `SGLITE_GEMV=1` (read at import; or set
`gemv.ENABLED`): measured, it does not beat cuBLAS in the whole step (see gemv_config).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import allow_dependents, chain_launch, pdl_options, wait_for_previous

ENABLED = os.environ.get("SGLITE_GEMV", "0") == "1"
# (n, k) -> tiles, consulted before gemv_config's default (bench/decode_floor.py fills it from
# the same call's --gemv-sweep before it times the GEMV variants)
TILES: dict[tuple[int, int], dict] = {}


@triton.jit
def _gemv_kernel(
    X, W, Out, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,  # pdl.chain_launch: the next kernel launches after the wait
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0).to(tl.int64)  # in-bounds rows; the store drops the extra
    offs_k = tl.arange(0, BLOCK_K)
    # runs of 8 along K; x loaded as a [BLOCK_N, BLOCK_K] tile (each row the same, L1 hits) so
    # that its 16-byte loads take W's layout: a [1, BLOCK_K] x went through shared memory with
    # two barriers per step (sm90 SASS)
    offs_k8 = tl.max_contiguous(offs_k, 8)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k8[None, :]
    x_ptrs = X + (rows * 0)[:, None] + offs_k8[None, :]
    # weights only before the wait: nothing in the forward writes them (pdl.py)
    w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0)
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0)
        # the next chunk before this one's products (all masked off on the last step)
        w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=(k0 + BLOCK_K + offs_k < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
        w = w_next
    out = tl.sum(acc, axis=1)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=mask_n)


def gemv_config(n: int, k: int) -> dict:
    """Tiles for W [n, k]: 4 rows a program, 512-column chunks, 4 warps: the best of six tiles on
    each Gemma-2-9B projection alone (H200, bench/decode_floor.py --gemv-sweep, 2026-12-02):
    qkv 17.5 us (3.36 TB/s), o 9.6 (3.05), gate_up 50.7 (4.05), down 29.7 (3.46); 8x512 with 4
    warps (the first default) was 8 us a layer slower and lost 0.21 ms a step to cuBLAS in the
    whole step. Even these tiles only tie cuBLAS's in-model times (qkv 16.6, o 10 + 1.7 reduce,
    gate_up 52, down 28 + 1.7), hence off by default. TILES overrides per shape."""
    if (n, k) in TILES:
        return dict(TILES[(n, k)])
    return dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=1)


def use_gemv(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether gemv() serves F.linear(x, weight, bias): one row, CUDA, 16-bit, no bias."""
    return (ENABLED and bias is None and x.is_cuda and x.dim() == 2 and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.stride(-1) == 1 and x.stride(-1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, config: dict | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K], weight [N, K] (rows contiguous) -> [1, N] in x's dtype."""
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
        **({"EARLY": True} if chain_launch(x) else {}))
    return out
