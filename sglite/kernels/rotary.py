"""Rotary embedding on q and k in one launch, in place (non-interleaved "rotate_half" layout).

For each head vector x = [x1, x2] (halves of head_dim) at a token with angles a (head_dim / 2):
  out = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]
cos/sin come precomputed in fp32 per token (the model computes them once per forward from the
positions and its possibly llama3-scaled inv_freq), and the rotation runs in fp32 with one
rounding at the store. q and k may be strided views into a fused QKV projection output: only the
head_dim axis must be contiguous. One program rotates every q and k head of one token.

With the KV pool's buffers and the tokens' slots (`k_buffer`, `v_buffer`, `loc`, and `v`), the
same launch also stores the rotated k and v at the slots, which store_kv did in a launch of its
own: at batch 1 that launch and the gap before it cost 18-62 us of a ~4.5 ms Llama-3-8B decode
step (32 layers; H200, interleaved graph replays, docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import allow_dependents, early_launch, pdl_options, wait_for_previous
from .store_kv import copy_token_heads


@triton.jit
def _rotate_heads(X, stride_t, stride_h, cur_token, cos, sin, num_heads, Dst, stride_dst_h,
                  HAS_DST: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  HALF: tl.constexpr):
    """Rotate X[cur_token] in place; with HAS_DST also write the result at Dst (a pool row)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
    ptr1 = X + cur_token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(X.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(X.dtype.element_ty)
    tl.store(ptr1, y1, mask=mask)
    tl.store(ptr1 + HALF, y2, mask=mask)
    if HAS_DST:
        dst1 = Dst + offs_h[:, None] * stride_dst_h + offs_d[None, :]
        tl.store(dst1, y1.to(Dst.dtype.element_ty), mask=mask)
        tl.store(dst1 + HALF, y2.to(Dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, V, Cos, Sin, K_Buf, V_Buf, Loc,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    num_q_heads, num_k_heads,
    HAS_K: tl.constexpr, STORE_KV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    EARLY: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)  # decode attention launches now and reads its batch metadata
    cur_token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(Cos + cur_token * stride_cos + offs_d, mask=mask_d, other=0.0)[None, :]
    sin = tl.load(Sin + cur_token * stride_sin + offs_d, mask=mask_d, other=0.0)[None, :]
    _rotate_heads(Q, stride_qt, stride_qh, cur_token, cos, sin, num_q_heads, Q, 0,
                  False, BLOCK_QH, BLOCK_HALF, HALF)
    if HAS_K:
        slot = 0
        if STORE_KV:
            slot = tl.load(Loc + cur_token).to(tl.int64)
        _rotate_heads(K, stride_kt, stride_kh, cur_token, cos, sin, num_k_heads,
                      K_Buf + slot * stride_buf_kt, stride_buf_kh, STORE_KV, BLOCK_KH, BLOCK_HALF, HALF)
        if STORE_KV:  # v as it is
            copy_token_heads(V + cur_token * stride_vt, stride_vh, V_Buf + slot * stride_buf_vt,
                             stride_buf_vh, num_k_heads, BLOCK_KH, BLOCK_D, HEAD_DIM)


def _check_qk(x: torch.Tensor, name: str, num_tokens: int, head_dim: int) -> None:
    if x.dim() != 3 or x.shape[0] != num_tokens or x.shape[2] != head_dim or x.stride(-1) != 1:
        raise ValueError(f"rotary: {name} must be [{num_tokens}, heads, {head_dim}] with a "
                         f"contiguous head_dim axis, got {tuple(x.shape)} strides {x.stride()}")


def apply_rotary_qk(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor | None,  # [T, KH, D], rotated in place; None: a layer that produces no KV
    cos: torch.Tensor,  # [T, D / 2] fp32
    sin: torch.Tensor,  # [T, D / 2] fp32
    *,
    v: torch.Tensor | None = None,  # [T, KH, D]: with the pool buffers, stored as it is
    k_buffer: torch.Tensor | None = None,  # [num_slots, KH, D] pool buffers: rotated k and v
    v_buffer: torch.Tensor | None = None,  # are stored at loc (in the buffers' dtype)
    loc: torch.Tensor | None = None,  # [T] int slots
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    _check_qk(q, "q", num_tokens, head_dim)
    if k is not None:
        _check_qk(k, "k", num_tokens, head_dim)
        if k.dtype != q.dtype:
            raise ValueError(f"rotary: q dtype {q.dtype} != k dtype {k.dtype}")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if head_dim % 2 or t.shape != (num_tokens, half) or t.stride(-1) != 1 or t.dtype != torch.float32:
            raise ValueError(f"rotary: {name} must be fp32 [{num_tokens}, {half}] (even head_dim "
                             f"{head_dim}), got {t.dtype} {tuple(t.shape)}")
    store = k_buffer is not None
    if store:
        _check_store(k, v, k_buffer, v_buffer, loc, num_tokens)
    if num_tokens == 0:
        return
    k_arg = k if k is not None else q  # unused pointers when HAS_K / STORE_KV are off
    v_arg, kb, vb = (v, k_buffer, v_buffer) if store else (k_arg, k_arg, k_arg)
    num_k_heads = k.shape[1] if k is not None else 0
    _rotary_kernel[(num_tokens,)](
        q, k_arg, v_arg, cos, sin, kb, vb, loc if store else cos,
        q.stride(0), q.stride(1), k_arg.stride(0), k_arg.stride(1), v_arg.stride(0), v_arg.stride(1),
        cos.stride(0), sin.stride(0),
        kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1),
        num_q_heads, num_k_heads,
        HAS_K=k is not None, STORE_KV=store, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(max(num_k_heads, 1)),
        BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim, EARLY=early_launch(q),
        num_warps=4 if q.is_cuda else 1, **pdl_options(q),
    )


def _check_store(k, v, k_buffer, v_buffer, loc, num_tokens) -> None:
    if k is None or v is None or v_buffer is None or loc is None:
        raise ValueError("rotary: storing into the pool needs k, v, both buffers and loc")
    if v.shape != k.shape or v.stride(-1) != 1:
        raise ValueError(f"rotary: v {tuple(v.shape)} must match k {tuple(k.shape)} with a contiguous head_dim")
    if k_buffer.shape[1:] != k.shape[1:] or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"rotary: K/V {tuple(k.shape)} do not fit the buffers {tuple(k_buffer.shape)}/"
                         f"{tuple(v_buffer.shape)}")
    if k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("rotary: the buffers need a contiguous head_dim axis")
    if loc.shape != (num_tokens,):
        raise ValueError(f"rotary: loc has shape {tuple(loc.shape)}, expected ({num_tokens},)")


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, D / 2] fp32 -> rotated copy in x's dtype (fp32 math)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
