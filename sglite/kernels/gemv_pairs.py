"""Batch-1 projections whose one-row GEMV (gemv.py) programs own a pair of rows, with an
epilogue over the pair: one launch for what the GEMV and the small kernel after it did in two.

Each program streams its two weight rows as the one-row GEMV does (gemv.stream_rows: the first
weight chunk loaded before the PDL wait), rounds both sums to the output dtype (the projection's
output as the next kernel would read it) and then:

- `gemv_rope` (the fused [q heads | k heads | v heads] x head_dim qkv projection): the pair is
  dims j and j + head_dim / 2 of one head ("rotate_half" layout); q and k rows are rotated in
  fp32 by the token's (cos, sin)[j] and rounded once, as rotary.py does, and written to the
  output (q and k come back rotated, as the in-place rotary leaves them); k and v rows are also
  stored into the pool's K / V buffers at the token's slot. Replaces the single-program rotary
  launch (with its KV store) between the qkv GEMV and decode attention.
- `gemv_glu` (the fused [gate | up] projection, I rows each): the pair is gate row j and up row
  I + j; the program writes act(gate) * up (activation.act_and_mul: SwiGLU or GeGLU, rounded as
  the activation kernel) to out[j]. Replaces the activation launch between gate_up and down.

Both let the next kernel launch right after their wait (early launch, pdl.py): decode attention
or the down projection's GEMV. Same bits as the two launches they replace
(tests/kernels/test_gemv_pairs.py). For one token (batch-1 decode). gemv_rope: full rotary, no
q/k norms between projection and rotation (Gemma 2; Gemma 3's q/k norms keep the two launches),
a pool of the activation's dtype. `ROPE` / `GLU` (SGLITE_GEMV_ROPE=0 / SGLITE_GEMV_GLU=0 turn
them off; read at call time by the model, so benchmarks may flip them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .activation import act_and_mul
from .gemv import stream_rows
from .pdl import chain_options, pdl_options

ROPE = os.environ.get("SGLITE_GEMV_ROPE", "1") != "0"
GLU = os.environ.get("SGLITE_GEMV_GLU", "1") != "0"


@triton.jit
def _gemv_rope_kernel(
    X, W, Out, Cos, Sin, K_Buf, V_Buf, Loc, K, stride_wn,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // HALF
    j = pid % HALF
    r = tl.arange(0, 2)  # the pair: dims j and j + HALF of the head
    rows = (head * HEAD_DIM + j + r * HALF).to(tl.int64)
    acc = stream_rows(X, W, rows, K, stride_wn, BLOCK_K, USE_PDL, EARLY)  # waits for x inside
    y = acc.to(Out.dtype.element_ty).to(tl.float32)  # the projection's output, as rotary reads it
    x1 = tl.sum(tl.where(r == 0, y, 0.0), 0)
    x2 = tl.sum(tl.where(r == 1, y, 0.0), 0)
    cos = tl.load(Cos + j)
    sin = tl.load(Sin + j)
    rotated = tl.where(r == 0, x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    is_v = head >= NUM_Q_HEADS + NUM_KV_HEADS
    out = tl.where(is_v, y, rotated).to(Out.dtype.element_ty)
    tl.store(Out + rows, out)
    if head >= NUM_Q_HEADS:
        slot = tl.load(Loc).to(tl.int64)
        dims = j + r * HALF
        if is_v:
            dst = V_Buf + slot * stride_buf_vt + (head - NUM_Q_HEADS - NUM_KV_HEADS) * stride_buf_vh + dims
            tl.store(dst, out.to(V_Buf.dtype.element_ty))
        else:
            dst = K_Buf + slot * stride_buf_kt + (head - NUM_Q_HEADS) * stride_buf_kh + dims
            tl.store(dst, out.to(K_Buf.dtype.element_ty))


def gemv_rope(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [(H + 2 KH) * D, K], rows contiguous
    cos: torch.Tensor,  # [1, D / 2] fp32
    sin: torch.Tensor,  # [1, D / 2] fp32
    k_buffer: torch.Tensor,  # [num_slots, KH, D]
    v_buffer: torch.Tensor,
    loc: torch.Tensor,  # [1] int slot of the token
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_k: int = 512,
    num_warps: int = 4,
    early: bool = True,
) -> torch.Tensor:
    """-> [1, N] in x's dtype: q and k rotated, v as projected; k and v also stored at loc.
    early: decode attention (a PDL launch) launches once this kernel's programs have waited."""
    n, k = weight.shape
    half = head_dim // 2
    if x.shape != (1, k) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv_rope: x {tuple(x.shape)}, weight {tuple(weight.shape)} (need [1, K], [N, K])")
    if head_dim % 2 or n != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"gemv_rope: {n} rows are not {num_heads} + 2 x {num_kv_heads} heads of {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (1, half) or t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"gemv_rope: {name} must be fp32 [1, {half}], got {t.dtype} {tuple(t.shape)}")
    for buf in (k_buffer, v_buffer):
        if buf.shape[1:] != (num_kv_heads, head_dim) or buf.stride(-1) != 1 or buf.dtype != x.dtype:
            raise ValueError(f"gemv_rope: pool buffer {buf.dtype} {tuple(buf.shape)} does not take "
                             f"{num_kv_heads} x {head_dim} {x.dtype} rows")
    if loc.shape != (1,):
        raise ValueError(f"gemv_rope: loc has shape {tuple(loc.shape)}, expected (1,)")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_rope_kernel[(n // 2,)](
        x, weight, out, cos, sin, k_buffer, v_buffer, loc, k, weight.stride(0),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_K=block_k,
        num_warps=num_warps if x.is_cuda else 1, num_stages=1, **pdl_options(x), **chain_options(x, early),
    )
    return out


@triton.jit
def _gemv_glu_kernel(
    X, W, Out, K, stride_wn, I,
    BLOCK_K: tl.constexpr, GELU: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
):
    j = tl.program_id(0)
    r = tl.arange(0, 2)  # the pair: gate row j and up row I + j
    rows = (j + r * I).to(tl.int64)
    acc = stream_rows(X, W, rows, K, stride_wn, BLOCK_K, USE_PDL, EARLY)  # waits for x inside
    y = acc.to(Out.dtype.element_ty).to(tl.float32)  # the projection's output, as the activation reads it
    gate = tl.sum(tl.where(r == 0, y, 0.0), 0)
    up = tl.sum(tl.where(r == 1, y, 0.0), 0)
    tl.store(Out + j, act_and_mul(gate, up, Out, GELU))


def gemv_glu(x: torch.Tensor, weight: torch.Tensor, *, gelu: bool, block_k: int = 512, num_warps: int = 4,
             early: bool = True) -> torch.Tensor:
    """x [1, K], weight [2I, K] (gate rows then up rows, contiguous) -> act(gate) * up [1, I] in
    x's dtype (act: gelu_pytorch_tanh when gelu, else silu). early: the next kernel (a PDL launch)
    launches once this kernel's programs have waited."""
    n, k = weight.shape
    if x.shape != (1, k) or x.stride(-1) != 1 or weight.stride(-1) != 1 or n % 2:
        raise ValueError(f"gemv_glu: x {tuple(x.shape)}, weight {tuple(weight.shape)} (need [1, K], [2I, K])")
    out = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
    _gemv_glu_kernel[(n // 2,)](
        x, weight, out, k, weight.stride(0), n // 2, BLOCK_K=block_k, GELU=gelu,
        num_warps=num_warps if x.is_cuda else 1, num_stages=1, **pdl_options(x), **chain_options(x, early),
    )
    return out
