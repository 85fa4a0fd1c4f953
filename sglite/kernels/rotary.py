"""Rotary embedding on q and k in one launch, in place (non-interleaved "rotate_half" layout).

For each head vector x = [x1, x2] (halves of head_dim) at a token with angles a (head_dim / 2):
  out = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]
cos/sin come precomputed in fp32 per token (the model computes them once per forward from the
positions and its possibly llama3-scaled inv_freq), and the rotation runs in fp32 with one
rounding at the store. q and k may be strided views into a fused QKV projection output: only the
head_dim axis must be contiguous. One program rotates every q and k head of one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, stride_t, stride_h, cur_token, cos, sin, num_heads,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
    ptr1 = X + cur_token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, Cos, Sin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    num_q_heads, num_k_heads,
    HAS_K: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
):
    cur_token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(Cos + cur_token * stride_cos + offs_d, mask=mask_d, other=0.0)[None, :]
    sin = tl.load(Sin + cur_token * stride_sin + offs_d, mask=mask_d, other=0.0)[None, :]
    _rotate_heads(Q, stride_qt, stride_qh, cur_token, cos, sin, num_q_heads,
                  BLOCK_QH, BLOCK_HALF, HALF)
    if HAS_K:
        _rotate_heads(K, stride_kt, stride_kh, cur_token, cos, sin, num_k_heads,
                      BLOCK_KH, BLOCK_HALF, HALF)


def _check_qk(x: torch.Tensor, name: str, num_tokens: int, head_dim: int) -> None:
    if x.dim() != 3 or x.shape[0] != num_tokens or x.shape[2] != head_dim or x.stride(-1) != 1:
        raise ValueError(f"rotary: {name} must be [{num_tokens}, heads, {head_dim}] with a "
                         f"contiguous head_dim axis, got {tuple(x.shape)} strides {x.stride()}")


def apply_rotary_qk(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor | None,  # [T, KH, D], rotated in place; None: a layer that produces no KV
    cos: torch.Tensor,  # [T, D / 2] fp32
    sin: torch.Tensor,  # [T, D / 2] fp32
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
    if num_tokens == 0:
        return
    k_arg = k if k is not None else q  # unused pointer when HAS_K is off
    num_k_heads = k.shape[1] if k is not None else 0
    _rotary_kernel[(num_tokens,)](
        q, k_arg, cos, sin,
        q.stride(0), q.stride(1), k_arg.stride(0), k_arg.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, num_k_heads,
        HAS_K=k is not None, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(max(num_k_heads, 1)),
        num_warps=4 if q.is_cuda else 1,
    )


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, D / 2] fp32 -> rotated copy in x's dtype (fp32 math)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
