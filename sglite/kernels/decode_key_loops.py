"""Decode attention's loops over one split's keys: each K/V tile through the online softmax, for
all query heads of the KV head's group at once (decode_attention.py's stage-1 kernel calls them).

Two ways to read the tiles: gathered row by row through the request's slot ids (`gather_loop`,
anywhere in the pool), or, when every tile of the split lies on consecutive slots (a paged pool:
`tiles_consecutive` checks), one TMA bulk copy per tile for K and one for V (`bulk_loop`). An FP8
pool goes through fp8_kv_tiles' steps (values as byte pairs widened in registers; optionally
q.K^T as an FP8 product). On the visible axis of a sliding window with global tokens the split's
offsets map to positions through `visible_pos`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fp8_kv_tiles import fp8_keys_step, fp8_values_split_step, fp8_values_step
from .online_softmax import online_softmax_step, softcap, values_step

_MAX_SLOT = tl.constexpr(2**31 - 1)  # above any slot id (req_to_token is int32)


@triton.jit
def visible_pos(offs, num_head, win_start, HAS_WINDOW: tl.constexpr):
    """Positions of points on the visible axis: the global head [0, num_head), then the window."""
    if HAS_WINDOW:
        return tl.where(offs < num_head, offs, offs - num_head + win_start)
    return offs


@triton.jit
def gather_loop(q, k_base, v_base, req_slots, split_start, split_end, num_head, win_start, offs_d, mask_d,
                 qk_scale, logit_cap, v_scale, stride_kt, stride_vt, m_i, l_i, acc, acc2,
                 HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr,
                 WIDEN_ASM: tl.constexpr, Q_FP8: tl.constexpr = False, V_SPLIT: tl.constexpr = 0):
    """The split's keys wherever they lie in the pool: every tile's K and V rows gathered by slot."""
    for start_n in range(split_start, split_end, BLOCK_N):
        k, slots, mask_n, mask_kv = tile_keys(k_base, req_slots, start_n, split_end, num_head, win_start, offs_d,
                                              mask_d, stride_kt, HAS_WINDOW, BLOCK_N)
        k = k.to(q.dtype)  # FP8 pool: widened (its scale is in qk_scale); with Q_FP8 kept FP8
        if Q_FP8:
            offs_pair = tl.arange(0, acc.shape[0] // 2)
            pairs = tl.load((v_base + slots[:, None] * stride_vt).to(tl.pointer_type(tl.int16))
                            + offs_pair[None, :], mask=mask_n[:, None], other=0)
            acc, l_i, m_i = fp8_keys_step(q, k, mask_n, pairs, qk_scale, logit_cap, v_scale, m_i, l_i, acc,
                                           HAS_CAP, WIDEN_ASM)
        else:
            qk = masked_scores(q, k, mask_n, qk_scale, logit_cap, HAS_CAP)
            if KV_FP8:  # the values as byte pairs (see fp8_kv_tiles.fp8_values_step)
                offs_pair = tl.arange(0, acc2.shape[1])
                pairs = tl.load((v_base + slots[:, None] * stride_vt).to(tl.pointer_type(tl.int16))
                                + offs_pair[None, :], mask=mask_n[:, None], other=0)
                if V_SPLIT:
                    acc, acc2, l_i, m_i = fp8_values_split_step(qk, pairs, v_scale, m_i, l_i, acc, acc2,
                                                                V_SPLIT if WIDEN_ASM else 0)
                else:
                    acc, l_i, m_i = fp8_values_step(qk, pairs, v_scale, m_i, l_i, acc, WIDEN_ASM)
            else:
                acc, l_i, m_i = online_softmax_step(qk, v_base + slots[:, None] * stride_vt + offs_d[None, :],
                                                    mask_kv, m_i, l_i, acc, v_scale, KV_FP8)
    return acc, acc2, l_i, m_i


@triton.jit
def masked_scores(q, k, mask_n, qk_scale, logit_cap, HAS_CAP: tl.constexpr):
    """q.K^T of a tile of 16-bit (or widened) keys, scaled and soft-capped for the base-2 softmax,
    -inf where mask_n [N] leaves a key out."""
    return tl.where(mask_n[None, :], softcap(tl.dot(q, tl.trans(k)) * qk_scale, logit_cap, HAS_CAP), float("-inf"))


@triton.jit
def tile_keys(k_base, req_slots, start_n, split_end, num_head, win_start, offs_d, mask_d, stride_kt,
              HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile's K rows gathered by slot id (keys start_n.. of the split; zeros past its end),
    the slot ids, and the keys' and rows' masks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < split_end
    slots = tl.load(req_slots + visible_pos(offs_n, num_head, win_start, HAS_WINDOW), mask=mask_n,
                    other=0).to(tl.int64)
    mask_kv = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_base + slots[:, None] * stride_kt + offs_d[None, :], mask=mask_kv, other=0.0)
    return k, slots, mask_n, mask_kv


@triton.jit
def tile_rows(k_base, v_base, req_slots, start_n, split_end, num_head, win_start, offs_d, mask_d, stride_kt,
              stride_vt, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile's K and V rows gathered by slot id, and the slot ids: the tile the stage-1 kernel
    loads before its PDL wait (16-bit pools)."""
    k, slots, mask_n, mask_kv = tile_keys(k_base, req_slots, start_n, split_end, num_head, win_start, offs_d,
                                          mask_d, stride_kt, HAS_WINDOW, BLOCK_N)
    v = tl.load(v_base + slots[:, None] * stride_vt + offs_d[None, :], mask=mask_kv, other=0.0)
    return k, v, slots


@triton.jit
def early_tile_step(q, k, v, slots, start_n, split_end, new_key, k_base, v_base, offs_d, mask_d, stride_kt,
                    stride_vt, qk_scale, logit_cap, m_i, l_i, acc, HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold a tile that tile_rows loaded before the PDL wait into (acc, l_i, m_i): its rows are
    the pool's as earlier forwards left them, but for the new token's (visible point new_key), which
    the kernel before this one stored: that row is read again here, after the wait. 16-bit pools."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    is_new = offs_n == new_key
    new_slot = tl.sum(tl.where(is_new, slots, 0), 0)
    # the row's columns where the tile holds the new token (a block mask: the interpreter takes no scalar one)
    mask_new = mask_d & (offs_d * 0 + tl.sum(is_new.to(tl.int32), 0) > 0)
    k_new = tl.load(k_base + new_slot * stride_kt + offs_d, mask=mask_new, other=0.0)
    v_new = tl.load(v_base + new_slot * stride_vt + offs_d, mask=mask_new, other=0.0)
    k = tl.where(is_new[:, None], k_new[None, :], k)
    v = tl.where(is_new[:, None], v_new[None, :], v)
    qk = masked_scores(q, k, offs_n < split_end, qk_scale, logit_cap, HAS_CAP)
    return values_step(qk, v, m_i, l_i, acc)


@triton.jit
def tiles_consecutive(req_slots, split_start, split_end, num_head, win_start,
                       HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_N: tl.constexpr):
    """Whether every BLOCK_N tile of the split has its live keys on consecutive slots, reading
    the slot ids CHECK_N at a time (a pass over 1/64 of the bytes the split's K and V hold)."""
    ok = (split_start >= 0).to(tl.int32)
    for c0 in range(split_start, split_end, CHECK_N):
        offs = c0 + tl.arange(0, CHECK_N)
        live = offs < split_end
        slots = tl.load(req_slots + visible_pos(offs, num_head, win_start, HAS_WINDOW), mask=live, other=0)
        run = slots - tl.arange(0, CHECK_N) % BLOCK_N  # one value per tile iff consecutive
        lo = tl.min(tl.reshape(tl.where(live, run, _MAX_SLOT), [CHECK_N // BLOCK_N, BLOCK_N]), 1)
        hi = tl.max(tl.reshape(tl.where(live, run, -1), [CHECK_N // BLOCK_N, BLOCK_N]), 1)
        ok = ok & tl.min(((lo == hi) | (hi == -1)).to(tl.int32), 0)
    return ok != 0


@triton.jit
def bulk_loop(q, K_desc, V_desc, req_slots, split_start, split_end, num_head, win_start, kv_col, qk_scale,
               logit_cap, v_scale, m_i, l_i, acc, acc2, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
               BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr, WIDEN_ASM: tl.constexpr, Q_FP8: tl.constexpr = False,
               V_SPLIT: tl.constexpr = 0, AHEAD: tl.constexpr = 0, STAGES: tl.constexpr = 2):
    """The split's keys when every tile lies on consecutive slots: one TMA copy per tile for K
    and for V from the tile's first slot. Masked rows past the request's end read whatever
    follows (finite: the pool is zeroed and holds only KV; weighted by 0); past the pool's end,
    zeros.

    The tiles' first slots are a load inside the loop by default, and triton 3.6 then gives that
    load the pipeline's stages and the K / V tiles a single buffer at any num_stages (each tile
    waits for its own bytes; TTGIR, sm90). With AHEAD > 0 the first slots of AHEAD tiles at a time
    are loaded before an inner loop of STAGES stages that picks its coordinate from them in
    registers, so the tiles get STAGES - 1 buffers."""
    if AHEAD > 0:
        idx = tl.arange(0, AHEAD)
        for c0 in range(split_start, split_end, AHEAD * BLOCK_N):
            starts = c0 + idx * BLOCK_N
            firsts = tl.load(req_slots + visible_pos(starts, num_head, win_start, HAS_WINDOW),
                             mask=starts < split_end, other=0)
            num_tiles = tl.minimum(tl.cdiv(split_end - c0, BLOCK_N), AHEAD)
            for i in tl.range(0, num_tiles, num_stages=STAGES):
                first = tl.sum(tl.where(idx == i, firsts, 0), 0)
                acc, acc2, l_i, m_i = _bulk_tile(q, K_desc, V_desc, first, c0 + i * BLOCK_N, split_end, kv_col,
                                                 qk_scale, logit_cap, v_scale, m_i, l_i, acc, acc2, HAS_CAP,
                                                 BLOCK_N, KV_FP8, WIDEN_ASM, Q_FP8, V_SPLIT)
    else:
        for start_n in range(split_start, split_end, BLOCK_N):
            first = tl.load(req_slots + visible_pos(start_n, num_head, win_start, HAS_WINDOW))
            acc, acc2, l_i, m_i = _bulk_tile(q, K_desc, V_desc, first, start_n, split_end, kv_col, qk_scale,
                                             logit_cap, v_scale, m_i, l_i, acc, acc2, HAS_CAP, BLOCK_N, KV_FP8,
                                             WIDEN_ASM, Q_FP8, V_SPLIT)
    return acc, acc2, l_i, m_i


@triton.jit
def _bulk_tile(q, K_desc, V_desc, first, start_n, split_end, kv_col, qk_scale, logit_cap, v_scale, m_i, l_i,
               acc, acc2, HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr,
               WIDEN_ASM: tl.constexpr, Q_FP8: tl.constexpr, V_SPLIT: tl.constexpr):
    """bulk_loop's step: the tile of consecutive slots from `first` (keys start_n.. of the split)."""
    k = K_desc.load([first, kv_col]).to(q.dtype)
    mask_n = start_n + tl.arange(0, BLOCK_N) < split_end
    if Q_FP8:
        acc, l_i, m_i = fp8_keys_step(q, k, mask_n, V_desc.load([first, kv_col // 2]), qk_scale, logit_cap,
                                       v_scale, m_i, l_i, acc, HAS_CAP, WIDEN_ASM)
    else:
        qk = masked_scores(q, k, mask_n, qk_scale, logit_cap, HAS_CAP)
        if KV_FP8 and V_SPLIT:  # V_desc views the FP8 values as int16 pairs (_descriptors)
            acc, acc2, l_i, m_i = fp8_values_split_step(qk, V_desc.load([first, kv_col // 2]), v_scale, m_i,
                                                        l_i, acc, acc2, V_SPLIT if WIDEN_ASM else 0)
        elif KV_FP8:
            acc, l_i, m_i = fp8_values_step(qk, V_desc.load([first, kv_col // 2]), v_scale, m_i, l_i, acc,
                                             WIDEN_ASM)
        else:
            acc, l_i, m_i = values_step(qk, V_desc.load([first, kv_col]), m_i, l_i, acc)
    return acc, acc2, l_i, m_i
