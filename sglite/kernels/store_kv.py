"""Store the new tokens' K and V into the pool at their slots (`out_cache_loc`), in one launch.

One program per token copies its [KH, D] rows of K and V. The source may be a strided view (K/V
split off a fused QKV projection): only the head_dim axis must be contiguous.

Into an FP8 (float8_e4m3fn) pool the rows are stored as x / scale, saturated at +-448 and rounded
to nearest even (fp8_gemm.round_to_e4m3), with the pool's per-buffer k_scale / v_scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import round_to_e4m3
from .pdl import pdl_options, wait_for_previous


@triton.jit
def copy_token_heads(Src, stride_src_h, Dst, stride_dst_h, num_heads,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One token's [num_heads, HEAD_DIM] rows from Src to Dst (each pointing at the token's first
    head), in Dst's dtype. Also the rotary kernel's store of v."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(Src + offs_h[:, None] * stride_src_h + offs_d[None, :], mask=mask)
    tl.store(Dst + offs_h[:, None] * stride_dst_h + offs_d[None, :], x.to(Dst.dtype.element_ty), mask=mask)


@triton.jit
def quantize_token_heads(Src, stride_src_h, Dst, stride_dst_h, num_heads, inv_scale,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """copy_token_heads into an FP8 Dst: round_to_e4m3(x * inv_scale)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(Src + offs_h[:, None] * stride_src_h + offs_d[None, :], mask=mask).to(tl.float32)
    tl.store(Dst + offs_h[:, None] * stride_dst_h + offs_d[None, :],
             round_to_e4m3(x * inv_scale).to(Dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    K, V, K_Buf, V_Buf, Loc,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    k_inv_scale, v_inv_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    wait_for_previous(USE_PDL)
    cur_token = tl.program_id(0)
    slot = tl.load(Loc + cur_token).to(tl.int64)
    src = cur_token.to(tl.int64)
    if QUANT:
        quantize_token_heads(K + src * stride_kt, stride_kh, K_Buf + slot * stride_buf_kt, stride_buf_kh,
                             NUM_KV_HEADS, k_inv_scale, BLOCK_H, BLOCK_D, HEAD_DIM)
        quantize_token_heads(V + src * stride_vt, stride_vh, V_Buf + slot * stride_buf_vt, stride_buf_vh,
                             NUM_KV_HEADS, v_inv_scale, BLOCK_H, BLOCK_D, HEAD_DIM)
    else:
        copy_token_heads(K + src * stride_kt, stride_kh, K_Buf + slot * stride_buf_kt, stride_buf_kh,
                         NUM_KV_HEADS, BLOCK_H, BLOCK_D, HEAD_DIM)
        copy_token_heads(V + src * stride_vt, stride_vh, V_Buf + slot * stride_buf_vt, stride_buf_vh,
                         NUM_KV_HEADS, BLOCK_H, BLOCK_D, HEAD_DIM)


def store_kv(
    k_buffer: torch.Tensor,  # [num_slots, KH, D]
    v_buffer: torch.Tensor,
    loc: torch.Tensor,  # [T] int slots
    k: torch.Tensor,  # [T, KH, D]
    v: torch.Tensor,
    *,
    k_scale: float = 1.0,  # FP8 buffers: stored = x / scale (ignored otherwise)
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.shape[1:] != k_buffer.shape[1:] or v.shape != k.shape or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"K/V {tuple(k.shape)}/{tuple(v.shape)} do not fit the buffers "
                         f"{tuple(k_buffer.shape)}/{tuple(v_buffer.shape)}")
    if loc.shape != (num_tokens,):
        raise ValueError(f"loc has shape {tuple(loc.shape)}, expected ({num_tokens},)")
    quant = k_buffer.dtype == torch.float8_e4m3fn
    if (k_buffer.dtype != k.dtype or v_buffer.dtype != v.dtype) and not (quant and v_buffer.dtype == k_buffer.dtype):
        raise ValueError(f"K/V dtype {k.dtype} != buffer dtype {k_buffer.dtype}")
    if any(t.stride(-1) != 1 for t in (k, v, k_buffer, v_buffer)):
        raise ValueError("K/V and the buffers need a contiguous last (head_dim) axis")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_buffer, v_buffer, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, QUANT=quant,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if k.is_cuda else 1, **pdl_options(k),
    )
