"""Decode attention over the paged KV pool: one query token per request, flash-decoding style.

Stage 1 splits each request's visible keys into `num_splits` chunks; a program per
(split, kv head, request) computes a partial softmax-weighted sum for all query heads of that KV
head's group (each K/V tile is loaded once and used by the whole group) and writes it with its
log-sum-exp. Stage 2 merges the splits. With many splits a single long request fills the GPU.

Sliding window W + G global tokens: the query at p = seq_len - 1 sees keys [0, G') followed by
[win_start, seq_len) where win_start = max(seq_len - W, 0) and G' = min(G, win_start). Stage 1
walks this "visible axis" (length G' + seq_len - win_start) and maps it to positions, so slots
outside the window (possibly freed, pointing at the padding slot 0) are never loaded, and the
splits divide only the visible keys.

All exponentials are base 2: scores are pre-multiplied by scale * log2(e), and the stored LSE is
in log2 units.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_attention_shapes

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 128  # H200, bs 1, W=4096: 17 splits of 256 keys 0.023 ms, 33 of 128 keys 0.015 ms


@triton.jit
def _decode_stage1_kernel(
    Q, K_Buf, V_Buf, Req_to_token, Req_pool_indices, Seq_lens,
    Mid_o, Mid_lse,  # [bs, H, splits, D] fp32, [bs, H, splits] fp32
    qk_scale, num_splits, sliding_window, num_global,
    stride_qb, stride_qh,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    stride_req,
    stride_mid_ob, stride_mid_oh, stride_mid_os,
    stride_lse_b, stride_lse_h,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    cur_split = tl.program_id(0)
    cur_kv_head = tl.program_id(1)
    cur_batch = tl.program_id(2)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    cur_heads = cur_kv_head * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    seq_len = tl.load(Seq_lens + cur_batch)
    req_row = tl.load(Req_pool_indices + cur_batch).to(tl.int64)
    if HAS_WINDOW:
        win_start = tl.maximum(seq_len - sliding_window, 0)
        num_head = tl.minimum(num_global, win_start)  # global tokens that lie before the window
        kv_len = num_head + seq_len - win_start
    else:
        win_start = 0
        num_head = 0
        kv_len = seq_len
    # whole BLOCK_N tiles per split keep every split but the last free of bound masks' waste
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    split_start = cur_split * split_len
    split_end = tl.minimum(split_start + split_len, kv_len)

    mask_q = mask_h[:, None] & mask_d[None, :]
    q = tl.load(Q + cur_batch * stride_qb + cur_heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_q, other=0.0)
    # finite start: a block whose keys are all masked then adds exp2(-inf) = 0, never NaN
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_base = K_Buf + cur_kv_head * stride_buf_kh
    v_base = V_Buf + cur_kv_head * stride_buf_vh
    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < split_end
        if HAS_WINDOW:
            pos = tl.where(offs_n < num_head, offs_n, offs_n - num_head + win_start)
        else:
            pos = offs_n
        slots = tl.load(Req_to_token + req_row * stride_req + pos, mask=mask_n, other=0).to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + slots[:, None] * stride_buf_kt + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slots[:, None] * stride_buf_vt + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # an empty split (short request) writes zeros and LSE -inf, which stage 2 weighs by 0
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    mid = cur_batch * stride_mid_ob + cur_heads[:, None] * stride_mid_oh + cur_split * stride_mid_os
    tl.store(Mid_o + mid + offs_d[None, :], acc / l_safe[:, None], mask=mask_q)
    tl.store(Mid_lse + cur_batch * stride_lse_b + cur_heads * stride_lse_h + cur_split, lse, mask=mask_h)


@triton.jit
def _decode_stage2_kernel(
    Mid_o, Mid_lse, O, num_splits,
    stride_mid_ob, stride_mid_oh, stride_mid_os,
    stride_lse_b, stride_lse_h,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    cur_head = tl.program_id(0)
    cur_batch = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(Mid_lse + cur_batch * stride_lse_b + cur_head * stride_lse_h + offs_s,
                  mask=mask_s, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds the query's own key: max is finite
    mid = cur_batch * stride_mid_ob + cur_head * stride_mid_oh
    part = tl.load(Mid_o + mid + offs_s[:, None] * stride_mid_os + offs_d[None, :],
                   mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
    tl.store(O + cur_batch * stride_ob + cur_head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_num_splits(batch_size: int, num_kv_heads: int, *, num_sms: int, max_kv_len: int | None = None) -> int:
    """KV splits per request. A batch with >= 2 (request, KV head) programs per SM needs none
    (H200, bs 64 x 8 KV heads x 4096: 1 split 0.257 ms, 2 splits 0.268); else enough splits for
    ~4 programs per SM (bs 1 x 32768: 64 splits 0.046 ms, 32 splits 0.050), at most MAX_SPLITS
    and, when the longest visible context is known, at least MIN_SPLIT_TOKENS keys each."""
    programs = batch_size * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    splits = triton.cdiv(4 * num_sms, programs)
    if max_kv_len is not None:
        splits = min(splits, triton.cdiv(max_kv_len, MIN_SPLIT_TOKENS))
    return max(1, min(splits, MAX_SPLITS))


def decode_tiles(head_dim: int, *, device: torch.device) -> dict:
    """The one tile table of this kernel: BLOCK_N keys per step, warps and pipeline depth.
    H200, d=128, random slots: 64 keys, 4 warps, 2 stages reads 4170 GB/s at bs 64 x 4096
    (copy: 4220 GB/s read + write); 8 warps: 3640; 128 keys: 3610 (bench/kernels.py --sweep)."""
    if device.type != "cuda":  # interpreter: small tiles so that tiny tests still take several steps
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    if head_dim <= 128:
        return dict(BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_N=32, num_warps=4, num_stages=2)


def decode_attention_fwd(
    q: torch.Tensor,  # [bs, H, D]
    k_buffer: torch.Tensor,  # [num_slots, KH, D], the new token's K already stored
    v_buffer: torch.Tensor,
    out: torch.Tensor,  # [bs, H, D], written
    req_to_token: torch.Tensor,  # [max_reqs, max_context] int32
    req_pool_indices: torch.Tensor,  # [bs] int
    seq_lens: torch.Tensor,  # [bs] int, including the new token
    *,
    scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    global_tokens: int = 0,
    mid_o: torch.Tensor | None = None,  # [bs, H, >= num_splits, D] fp32 scratch
    mid_lse: torch.Tensor | None = None,  # [bs, H, >= num_splits] fp32 scratch
    tiles: dict | None = None,  # overrides decode_tiles() (benchmarks)
) -> torch.Tensor:
    bs, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    _check(q, k_buffer, v_buffer, out, num_splits)
    if mid_o is None:
        mid_o = torch.empty(bs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    if mid_lse is None:
        mid_lse = torch.empty(bs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    cfg = dict(tiles or decode_tiles(head_dim, device=q.device))
    block_d = triton.next_power_of_2(head_dim)
    has_window = sliding_window is not None
    _decode_stage1_kernel[(num_splits, num_kv_heads, bs)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        scale * _LOG2E, num_splits, sliding_window if has_window else 0, global_tokens,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=cfg.pop("BLOCK_N"),
        HAS_WINDOW=has_window, **cfg,
    )
    _decode_stage2_kernel[(num_heads, bs)](
        mid_o, mid_lse, out, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4 if q.is_cuda else 1,
    )
    return out


def _check(q, k_buffer, v_buffer, out, num_splits) -> None:
    check_attention_shapes(q, k_buffer, v_buffer, out, q_layout="[bs, H, D]")
    if any(t.stride(-1) != 1 for t in (q, k_buffer, v_buffer, out)):
        raise ValueError("q, out and the K/V buffers need a contiguous last (head_dim) axis")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
