"""Extend (prefill) attention over the paged KV pool.

The new tokens of a batch of requests, packed request by request, attend to their cached prefix
(positions [0, prefix_len), read through `req_to_token`) and causally to themselves. The new
tokens' K/V are read from the contiguous `k_extend`/`v_extend` tensors the model just produced
(no index indirection); for layers that reuse another layer's KV (CLA) pass `k_extend=None` and
the kernel reads them from the pool through `out_cache_loc` instead.

One program per (KV head, request, block of BLOCK_M new tokens). Its query tile holds the
BLOCK_M tokens x all query heads of the KV head's group, flattened into BLOCK_M * BLOCK_G rows,
so each K/V tile is loaded once for the whole group. Online softmax in base 2.

Sliding window W + G global tokens: only key blocks that some row of the tile can see are
visited, and loads are masked to keys visible to at least one row, so slots outside the window
(possibly freed: the padding slot 0) are never read into the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_attention_shapes
from .online_softmax import online_softmax_step, softcap, softcap_args

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_range(
    acc, l_i, m_i, q, q_pos,  # running state; q [R, BLOCK_D]; q_pos [R] positions of the rows
    K, V, Loc, stride_kt, stride_vt,  # K/V already offset to the KV head; Loc: slot per key (GATHER)
    lo, hi, pos_base, win_lo,  # keys [lo, hi) of this source lie at positions pos_base + index
    qk_scale, logit_cap, v_scale, sliding_window, num_global,  # v_scale: an FP8 source's values
    offs_d, mask_d,
    BLOCK_N: tl.constexpr, GATHER: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    HAS_CAP: tl.constexpr, V_FP8: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_pos = pos_base + offs_n
        mask_n = offs_n < hi
        if WINDOW:  # keys before every row's window and not global: no row sees them, never read
            mask_n = mask_n & ((k_pos >= win_lo) | (k_pos < num_global))
        if GATHER:
            rows = tl.load(Loc + offs_n, mask=mask_n, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows[:, None] * stride_kt + offs_d[None, :], mask=mask_kv, other=0.0).to(q.dtype)
        qk = softcap(tl.dot(q, tl.trans(k)) * qk_scale, logit_cap, HAS_CAP)
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & ((k_pos[None, :] > q_pos[:, None] - sliding_window)
                                 | (k_pos[None, :] < num_global))
        qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(qk, V + rows[:, None] * stride_vt + offs_d[None, :], mask_kv,
                                            m_i, l_i, acc, v_scale, V_FP8)
    return acc, l_i, m_i


@triton.jit
def _extend_kernel(
    Q, O, K_Ext, V_Ext, Ext_loc,  # Q/O [T, H, D]; K/V_Ext [T, KH, D] (or the pool when EXT_FROM_POOL)
    K_Buf, V_Buf, Req_to_token, Req_pool_indices, Prefix_lens, Extend_lens, Extend_start,
    qk_scale, logit_cap, k_scale, v_scale, sliding_window, num_global,  # k/v_scale: an FP8 pool's
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ext_kt, stride_ext_kh, stride_ext_vt, stride_ext_vh,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    stride_req,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, EXT_FROM_POOL: tl.constexpr, HAS_CAP: tl.constexpr = False,
    KV_FP8: tl.constexpr = False, EXT_FP8: tl.constexpr = False,  # the pool / the new K/V source
):
    cur_kv_head = tl.program_id(0)
    cur_batch = tl.program_id(1)
    # last token blocks first: under the causal mask they carry the most keys
    cur_block = tl.num_programs(2) - 1 - tl.program_id(2)
    extend_len = tl.load(Extend_lens + cur_batch)
    if cur_block * BLOCK_M >= extend_len:
        return
    prefix_len = tl.load(Prefix_lens + cur_batch)
    ext_start = tl.load(Extend_start + cur_batch)
    req_row = tl.load(Req_pool_indices + cur_batch).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_M * BLOCK_G)
    offs_t = cur_block * BLOCK_M + offs_r // BLOCK_G  # token within the request's new tokens
    offs_g = offs_r % BLOCK_G
    mask_r = (offs_t < extend_len) & (offs_g < GROUP)
    cur_heads = cur_kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_q = mask_r[:, None] & mask_d[None, :]
    tok = (ext_start + offs_t).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + cur_heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_q, other=0.0)
    q_pos = prefix_len + offs_t
    tile_first = cur_block * BLOCK_M  # first new token of the tile
    win_lo = prefix_len + tile_first - sliding_window + 1  # first position the tile's first row sees

    m_i = tl.full([BLOCK_M * BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)

    # stage 1: the cached prefix through req_to_token (FP8 pool: its K scale folded into the scores)
    qk_pool = qk_scale * k_scale
    k_buf = K_Buf + cur_kv_head * stride_buf_kh
    v_buf = V_Buf + cur_kv_head * stride_buf_vh
    loc_prefix = Req_to_token + req_row * stride_req
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(win_lo, 0), prefix_len)
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_buf, v_buf, loc_prefix, stride_buf_kt, stride_buf_vt,
            0, tl.minimum(num_global, lo), 0, win_lo, qk_pool, logit_cap, v_scale, sliding_window, num_global,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=True, CAUSAL=False, WINDOW=False, HAS_CAP=HAS_CAP,
            V_FP8=KV_FP8)
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_buf, v_buf, loc_prefix, stride_buf_kt, stride_buf_vt,
            lo, prefix_len, 0, win_lo, qk_pool, logit_cap, v_scale, sliding_window, num_global,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=True, CAUSAL=False, WINDOW=True, HAS_CAP=HAS_CAP,
            V_FP8=KV_FP8)
    else:
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_buf, v_buf, loc_prefix, stride_buf_kt, stride_buf_vt,
            0, prefix_len, 0, 0, qk_pool, logit_cap, v_scale, 0, 0,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=True, CAUSAL=False, WINDOW=False, HAS_CAP=HAS_CAP,
            V_FP8=KV_FP8)

    # stage 2: the new tokens themselves, causal
    if EXT_FROM_POOL:
        k_ext = k_buf
        v_ext = v_buf
        stride_kt = stride_buf_kt
        stride_vt = stride_buf_vt
        qk_ext = qk_pool
    else:
        k_ext = K_Ext + ext_start.to(tl.int64) * stride_ext_kt + cur_kv_head * stride_ext_kh
        v_ext = V_Ext + ext_start.to(tl.int64) * stride_ext_vt + cur_kv_head * stride_ext_vh
        stride_kt = stride_ext_kt
        stride_vt = stride_ext_vt
        qk_ext = qk_scale
    loc_ext = Ext_loc + ext_start
    causal_end = tl.minimum(tile_first + BLOCK_M, extend_len)
    if HAS_WINDOW:
        # globals among the new tokens that precede the window, then the window up to the diagonal
        lo = tl.minimum(tl.maximum(win_lo - prefix_len, 0), tile_first)
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_ext, v_ext, loc_ext, stride_kt, stride_vt,
            0, tl.minimum(num_global - prefix_len, lo), prefix_len, win_lo,
            qk_ext, logit_cap, v_scale, sliding_window, num_global,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=EXT_FROM_POOL, CAUSAL=False, WINDOW=False, HAS_CAP=HAS_CAP,
            V_FP8=EXT_FP8)
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_ext, v_ext, loc_ext, stride_kt, stride_vt,
            lo, causal_end, prefix_len, win_lo, qk_ext, logit_cap, v_scale, sliding_window, num_global,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=EXT_FROM_POOL, CAUSAL=True, WINDOW=True, HAS_CAP=HAS_CAP,
            V_FP8=EXT_FP8)
    else:
        # keys before the tile's first token need no causal mask; only the diagonal blocks do
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_ext, v_ext, loc_ext, stride_kt, stride_vt,
            0, tile_first, prefix_len, 0, qk_ext, logit_cap, v_scale, 0, 0,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=EXT_FROM_POOL, CAUSAL=False, WINDOW=False, HAS_CAP=HAS_CAP,
            V_FP8=EXT_FP8)
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, k_ext, v_ext, loc_ext, stride_kt, stride_vt,
            tile_first, causal_end, prefix_len, 0, qk_ext, logit_cap, v_scale, 0, 0,
            offs_d, mask_d, BLOCK_N=BLOCK_N, GATHER=EXT_FROM_POOL, CAUSAL=True, WINDOW=False, HAS_CAP=HAS_CAP,
            V_FP8=EXT_FP8)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # padding rows have l = 0; not stored
    tl.store(O + tok[:, None] * stride_ot + cur_heads[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_q)


def extend_tiles(head_dim: int, block_g: int, *, device: torch.device) -> dict:
    """The one tile table of this kernel. BLOCK_M counts tokens; a tile has BLOCK_M * block_g rows."""
    if device.type != "cuda":  # interpreter: small tiles so tiny tests cross several blocks
        return dict(BLOCK_M=max(1, 16 // block_g), BLOCK_N=16, num_warps=1, num_stages=1)
    # H200, d=128, group 4, 2048 new tokens on 0 / 2048 cached (bench/kernels.py --sweep), TFLOP/s:
    # 256 rows x 64 keys, 8 warps, 3 stages: 333 / 349; 128 rows, 4 warps, 2 stages: 303 / 322;
    # 128 rows, 8 warps, 2 stages: 283 / 219; 128 keys per step: 117 / 130 (torch flash: 288 / 323)
    if head_dim <= 128:
        return dict(BLOCK_M=max(1, 256 // block_g), BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=max(1, 64 // block_g), BLOCK_N=32, num_warps=4, num_stages=2)


def extend_attention_fwd(
    q: torch.Tensor,  # [T, H, D], new tokens packed request by request
    k_extend: torch.Tensor | None,  # [T, KH, D] new K (None: read from the pool via out_cache_loc)
    v_extend: torch.Tensor | None,
    out: torch.Tensor,  # [T, H, D], written
    k_buffer: torch.Tensor,  # [num_slots, KH, D]
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,  # [max_reqs, max_context] int32
    req_pool_indices: torch.Tensor,  # [bs] int
    prefix_lens: torch.Tensor,  # [bs] int
    extend_lens: torch.Tensor,  # [bs] int
    extend_start_loc: torch.Tensor,  # [bs] int, exclusive cumsum of extend_lens
    *,
    max_extend_len: int,
    scale: float,
    out_cache_loc: torch.Tensor | None = None,  # [T] slots of the new tokens (needed if k_extend is None)
    sliding_window: int | None = None,
    global_tokens: int = 0,
    logit_cap: float | None = None,  # Gemma 2: scores s -> cap * tanh(s / cap)
    tiles: dict | None = None,  # overrides extend_tiles() (benchmarks)
    k_scale: float = 1.0,  # an FP8 pool's dequantization scales (K = stored K * k_scale); the
    v_scale: float = 1.0,  # new tokens' k/v_extend are read unquantized
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    _check(q, k_extend, v_extend, out, k_buffer, v_buffer, out_cache_loc)
    ext_from_pool = k_extend is None
    kv_fp8 = k_buffer.dtype == torch.float8_e4m3fn
    if ext_from_pool:
        k_extend, v_extend = k_buffer, v_buffer  # stride source only; rows come from out_cache_loc
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    cfg = dict(tiles or extend_tiles(head_dim, block_g, device=q.device))
    block_m = cfg.pop("BLOCK_M")
    bs = req_pool_indices.shape[0]
    has_window = sliding_window is not None
    grid = (num_kv_heads, bs, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, out, k_extend, v_extend, out_cache_loc if ext_from_pool else extend_lens,
        k_buffer, v_buffer, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
        *softcap_args(scale, logit_cap), k_scale, v_scale, sliding_window if has_window else 0, global_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_extend.stride(0), k_extend.stride(1), v_extend.stride(0), v_extend.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, HAS_WINDOW=has_window, EXT_FROM_POOL=ext_from_pool,
        HAS_CAP=logit_cap is not None, KV_FP8=kv_fp8, EXT_FP8=kv_fp8 and ext_from_pool, **cfg,
    )
    return out


def _check(q, k_extend, v_extend, out, k_buffer, v_buffer, out_cache_loc) -> None:
    check_attention_shapes(q, k_buffer, v_buffer, out, q_layout="[T, H, D]")
    if (k_extend is None) != (v_extend is None):
        raise ValueError("pass both k_extend and v_extend, or neither")
    if k_extend is None and out_cache_loc is None:
        raise ValueError("k_extend=None reads the new K/V from the pool and needs out_cache_loc")
    if k_extend is not None and (k_extend.shape[0] != q.shape[0] or k_extend.shape[1:] != k_buffer.shape[1:]
                                 or v_extend.shape != k_extend.shape):
        raise ValueError(f"k/v_extend shape {tuple(k_extend.shape)} does not fit q {tuple(q.shape)} "
                         f"and the KV buffers {tuple(k_buffer.shape)}")
    tensors = [q, out, k_buffer, v_buffer] + ([k_extend, v_extend] if k_extend is not None else [])
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("q, out, K/V and the K/V buffers need a contiguous last (head_dim) axis")
