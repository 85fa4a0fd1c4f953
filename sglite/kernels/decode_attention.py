"""Decode attention over the paged KV pool: one query token per request, flash-decoding style.

Stage 1 splits each request's visible keys into `num_splits` chunks; a program per
(split, kv head, request) computes a partial softmax-weighted sum for all query heads of that KV
head's group (each K/V tile is loaded once and used by the whole group) and writes it with its
log-sum-exp. With many splits a single long request fills the GPU. The merge of the splits runs
in one of three ways (the MERGE constexpr, chosen in decode_attention_fwd):
- "direct": one split, so the program writes the output itself (no partials, no second kernel);
- "fused": every program counts itself done on an int32 counter per (request, KV head) (atomic,
  acq_rel), and the last one merges the group's partials and resets the counter to 0, so the
  buffer is zero again for the next launch and inside captured CUDA graphs too. Only the splits
  that hold keys take part: a short request in a launch sized for long ones (a CUDA graph is
  captured for the context limit) leaves the empty splits at once, and one with a single
  non-empty split writes its output directly (Llama-3-8B bs 1 at 512 tokens: 32 splits captured,
  5 hold keys);
- "kernel": a second kernel merges (used when no counter buffer is at hand, see _counters).
The fused merge saves the second launch and the gap before it, which at batch 1 is a visible
share of the whole (docs/benchmarks.md, issue 6).

Sliding window W + G global tokens: the query at p = seq_len - 1 sees keys [0, G') followed by
[win_start, seq_len) where win_start = max(seq_len - W, 0) and G' = min(G, win_start). Stage 1
walks this "visible axis" (length G' + seq_len - win_start) and maps it to positions, so slots
outside the window (possibly freed, pointing at the padding slot 0) are never loaded, and the
splits divide only the visible keys.

Over a paged pool (page_size a multiple of the tile), a split whose every tile lies on consecutive
slots loads each tile with one TMA bulk copy for K and one for V instead of gathering 256-byte
rows by slot id: what separated this kernel from cuDNN on dense KV (docs/benchmarks.md, issue 6).

All exponentials are base 2: scores are pre-multiplied by scale * log2(e), and the stored LSE is
in log2 units.

This module holds the stage-1 kernel (split bounds, q, the merge's bookkeeping) and the launcher;
the split and tile policy is in decode_policy.py, the loops over a split's keys in
decode_key_loops.py, the merge of the partials in decode_merge.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older triton: gathers only
    TensorDescriptor = None

from .pdl import allow_dependents, early_launch, pdl_options, wait_for_previous

from .checks import check_attention_shapes
from .fp8_gemm import round_to_e4m3
from .decode_key_loops import bulk_loop, early_tile_step, gather_loop, tile_rows, tiles_consecutive
from .decode_merge import merge_group, merge_splits_kernel
from .decode_policy import MAX_SPLITS, decode_tiles
from .online_softmax import softcap_args

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_stage1_kernel(
    Q, K_Buf, V_Buf, K_desc, V_desc, Req_to_token, Req_pool_indices, Seq_lens,
    Mid_o, Mid_lse,  # [bs, H, splits, D] fp32, [bs, H, splits] fp32
    O, Counters,  # [bs, H, D] output (MERGE "direct" / "fused"); [bs * KH] int32, zero between launches
    qk_scale, logit_cap, v_scale, num_splits, num_kv_heads, sliding_window, num_global,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    stride_req,
    stride_mid_ob, stride_mid_oh, stride_mid_os,
    stride_lse_b, stride_lse_h,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, MERGE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
    CHUNK_S: tl.constexpr, USE_TMA: tl.constexpr, HAS_CAP: tl.constexpr = False,
    KV_FP8: tl.constexpr = False, WIDEN_ASM: tl.constexpr = False, Q_FP8: tl.constexpr = False,
    USE_PDL: tl.constexpr = False, EARLY: tl.constexpr = False, V_SPLIT: tl.constexpr = 0,
    AHEAD: tl.constexpr = 0, LOOP_STAGES: tl.constexpr = 2, EARLY_TILE: tl.constexpr = False,
):
    # before wait_for_previous only the batch's inputs (lengths, request rows, slot ids) and, with
    # EARLY_TILE, the pool's rows of earlier forwards: see pdl.py
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
    # splits that hold keys: a short request in a launch sized for long ones (CUDA graphs) has
    # few; with the fused merge the others leave at once and only these count and get merged
    active = tl.cdiv(kv_len, split_len)
    if MERGE == "fused":
        if cur_split >= active:
            return
    req_slots = Req_to_token + req_row * stride_req
    k_base = K_Buf + cur_kv_head * stride_buf_kh
    v_base = V_Buf + cur_kv_head * stride_buf_vh
    loop_start = split_start
    if EARLY_TILE:  # the split's first tile before the wait (all but the new token's row: see pdl.py)
        k0, v0, slots0 = tile_rows(k_base, v_base, req_slots, split_start, split_end, num_head, win_start, offs_d,
                                   mask_d, stride_buf_kt, stride_buf_vt, HAS_WINDOW, BLOCK_N)
        loop_start = split_start + BLOCK_N
    # every later tile on consecutive slots (pages): req_to_token, read before the wait too
    bulk = tiles_consecutive(req_slots, loop_start, split_end, num_head, win_start, HAS_WINDOW, BLOCK_N,
                             8 * BLOCK_N) if USE_TMA else False
    wait_for_previous(USE_PDL)  # q and the new token's K/V come from the kernel before
    allow_dependents(EARLY)  # the o projection (one-row GEMV: weights first) launches now

    mask_q = mask_h[:, None] & mask_d[None, :]
    q = tl.load(Q + cur_batch * stride_qb + cur_heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_q, other=0.0)
    if Q_FP8:
        # q rounded to e4m3 (one scale per head row), so that q.K^T runs on FP8 keys as they are
        # (an FP8 MMA: no key is widened); the row scales join qk_scale
        qf = q.to(tl.float32)
        q_sc = tl.maximum(tl.max(tl.abs(qf), 1), 1e-12) / 448.0
        q = round_to_e4m3(qf * (1.0 / q_sc)[:, None]).to(tl.float8e4nv)
        qk_scale = qk_scale * q_sc[None, :]  # scores come keys x heads (fp8_kv_tiles.fp8_keys_step)
    elif KV_FP8:
        # FP8 keys widen to fp16 in one unpack per pair; to bf16 (q's dtype) each element then
        # took a second conversion (F2F.BF16.F16 at 16/clock/SM: half an FP8 tile's time budget)
        q = q.to(tl.float16)
    # finite start: a block whose keys are all masked then adds exp2(-inf) = 0, never NaN
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if Q_FP8:
        acc = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)  # transposed: see fp8_kv_tiles.fp8_keys_step
    elif V_SPLIT:  # FP8 values' even columns here, odd ones in acc2 (fp8_kv_tiles.fp8_values_split_step)
        acc = tl.zeros([BLOCK_H, BLOCK_D // 2], tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_H, BLOCK_D // 2], tl.float32)  # unused (and dropped) unless V_SPLIT
    if EARLY_TILE:
        acc, l_i, m_i = early_tile_step(q, k0, v0, slots0, split_start, split_end, kv_len - 1, k_base, v_base,
                                        offs_d, mask_d, stride_buf_kt, stride_buf_vt, qk_scale, logit_cap, m_i,
                                        l_i, acc, HAS_CAP, BLOCK_N)
    if USE_TMA and bulk:  # (USE_TMA first: without it the bulk loop, which needs descriptors, is not compiled)
        acc, acc2, l_i, m_i = bulk_loop(q, K_desc, V_desc, req_slots, loop_start, split_end, num_head,
                                         win_start, cur_kv_head * HEAD_DIM, qk_scale, logit_cap, v_scale, m_i, l_i,
                                         acc, acc2, HAS_WINDOW, HAS_CAP, BLOCK_N, KV_FP8, WIDEN_ASM, Q_FP8, V_SPLIT,
                                         AHEAD, LOOP_STAGES)
    else:
        acc, acc2, l_i, m_i = gather_loop(q, k_base, v_base, req_slots, loop_start, split_end, num_head,
                                           win_start, offs_d, mask_d, qk_scale, logit_cap, v_scale, stride_buf_kt,
                                           stride_buf_vt, m_i, l_i, acc, acc2, HAS_WINDOW, HAS_CAP, BLOCK_N, KV_FP8,
                                           WIDEN_ASM, Q_FP8, V_SPLIT)
    if Q_FP8:
        acc = tl.trans(acc)
    elif V_SPLIT:
        acc = tl.interleave(acc, acc2)

    # an empty split (short request) writes zeros and LSE -inf, which the merge weighs by 0
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out_ptr = O + cur_batch * stride_ob + cur_heads[:, None] * stride_oh + offs_d[None, :]
    if MERGE == "direct":
        tl.store(out_ptr, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask_q)
    elif MERGE == "fused" and active == 1:  # the only split: no partials, no counter
        tl.store(out_ptr, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask_q)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
        mid = cur_batch * stride_mid_ob + cur_heads[:, None] * stride_mid_oh + cur_split * stride_mid_os
        tl.store(Mid_o + mid + offs_d[None, :], acc / l_safe[:, None], mask=mask_q)
        tl.store(Mid_lse + cur_batch * stride_lse_b + cur_heads * stride_lse_h + cur_split, lse, mask=mask_h)
        if MERGE == "fused":
            # every thread's partial stores precede the one release below (CUTLASS semaphore pattern)
            tl.debug_barrier()
            counter = Counters + cur_batch * num_kv_heads + cur_kv_head
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == active - 1:  # the others' partials are visible after the acquire
                tl.store(counter, 0)  # ready for the next launch (stream order)
                merge_group(Mid_o, Mid_lse, O, cur_batch, cur_kv_head * GROUP, active,
                             stride_mid_ob, stride_mid_oh, stride_mid_os, stride_lse_b, stride_lse_h,
                             stride_ob, stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_S, CHUNK_S)


COUNTER_SLOTS = 1 << 14  # (request, KV head) pairs one launch may fuse; more fall back to "kernel"
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed int32 counters for the fused merge, or None where the fused merge
    must not run: too many (request, KV head) pairs, or first use inside a CUDA-graph capture
    (a buffer zeroed there would only be zeroed on replay). Each launch leaves them zero again.
    One buffer per device: decode launches on one device must not run concurrently on two streams."""
    if needed > COUNTER_SLOTS:
        return None
    buf = _COUNTERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return buf


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
    logit_cap: float | None = None,  # Gemma 2: scores s -> cap * tanh(s / cap)
    mid_o: torch.Tensor | None = None,  # [bs, H, >= num_splits, D] fp32 scratch
    mid_lse: torch.Tensor | None = None,  # [bs, H, >= num_splits] fp32 scratch
    tiles: dict | None = None,  # overrides decode_tiles() (benchmarks)
    page_size: int = 1,  # the pool hands out runs of this many consecutive slots (see below)
    k_scale: float = 1.0,  # an FP8 pool's dequantization scales (K = stored K * k_scale)
    v_scale: float = 1.0,
    early_tile: bool = False,  # the split's first tile before the PDL wait (see EARLY_TILE)
) -> torch.Tensor:
    """With page_size a multiple of the tile, a request's tiles lie on consecutive slots as a
    rule: a split whose every tile does (checked in the kernel) then loads each with one TMA bulk
    copy for K and one for V (Hopper; the interpreter emulates them); other splits gather row by
    row. Any layout stays correct. An FP8 (e4m3) pool is read as it is, each tile widened in
    registers, and accumulated in fp32 like any other."""
    bs, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    _check(q, k_buffer, v_buffer, out, num_splits)
    kv_fp8 = k_buffer.dtype == torch.float8_e4m3fn
    cfg = dict(tiles or decode_tiles(head_dim, device=q.device, num_splits=num_splits, kv_fp8=kv_fp8))
    merge = cfg.pop("merge", "fused")  # "kernel" keeps two launches even for one split (benchmarks)
    if merge not in ("fused", "kernel"):
        raise ValueError(f"tiles['merge'] must be 'fused' or 'kernel', got {merge!r}")
    counters = None
    if num_splits == 1 and merge == "fused":
        merge = "direct"
    elif merge == "fused":
        counters = _counters(q.device, bs * num_kv_heads)
        if counters is None:
            merge = "kernel"
    if mid_o is None and merge != "direct":
        mid_o = torch.empty(bs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    if mid_lse is None and merge != "direct":
        mid_lse = torch.empty(bs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    if merge == "direct":  # no partials: any fp32 tensor stands in for the unused pointers
        mid_o = mid_lse = out.new_empty(1, 1, 1, 1, dtype=torch.float32)
    if counters is None:
        counters = seq_lens  # unused pointer
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_s = triton.next_power_of_2(num_splits)
    block_g = triton.next_power_of_2(group)
    has_window = sliding_window is not None
    block_n = cfg.pop("BLOCK_N")
    # bulk loads where they pay (H200, pages of 128 in random order, bench/kernels.py): split
    # requests (bs 1 x 32k: 0.038 vs 0.040 ms gathering the same pages); not a bf16 batch that needs
    # no splits (bs 64 x 4096: 0.250 vs 0.244 ms) nor a window (0.014 vs 0.013 ms); an FP8 one
    # (bs 64 x 4096, v_split 3, 3 stages: 0.1508 vs 0.1539 ms, H200 2026-12-04). tiles["tma"]
    # True/False overrides (tests, benchmarks).
    tma = cfg.pop("tma", None)
    # tiles["ahead"]: the TMA loop takes its tiles' first slots AHEAD at a time from registers,
    # so the compiler multi-buffers the tiles (decode_key_loops.bulk_loop); 0: loaded in the loop
    ahead = int(cfg.pop("ahead", 0))
    # tiles["q_fp8"]: q.K^T as an FP8 product (q rounded to e4m3 per head) on an FP8 pool
    q_fp8 = bool(cfg.pop("q_fp8", FP8_Q_PRODUCT)) and kv_fp8
    # tiles["v_split"]: FP8 values' P.V as two products (even / odd columns), widened as
    # fp8_kv_tiles.widen_pairs_apart's WIDEN (1 or 3; 2: integer ops as in the interpreter); 0:
    # one product on values widened first (fp8_kv_tiles.fp8_values_step)
    v_split = int(cfg.pop("v_split", FP8_V_SPLIT)) if kv_fp8 and not q_fp8 else 0
    early_tile = early_tile and EARLY_TILE and num_splits > 1 and not kv_fp8
    if tma is None:
        tma = (num_splits > 1 or kv_fp8) and not has_window
    paged = page_size > 1 and page_size % block_n == 0
    descs = _descriptors(k_buffer, v_buffer, block_n) if paged and tma else None
    k_desc, v_desc = descs or (k_buffer, v_buffer)  # without TMA: unused pointers
    _decode_stage1_kernel[(num_splits, num_kv_heads, bs)](
        q, k_buffer, v_buffer, k_desc, v_desc, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, out,
        counters,
        *softcap_args(scale * k_scale, logit_cap), v_scale, num_splits, num_kv_heads,
        sliding_window if has_window else 0,
        global_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_WINDOW=has_window, MERGE=merge, BLOCK_S=block_s, BLOCK_G=block_g,
        CHUNK_S=min(block_s, max(1, 16 // block_g)),  # fused merge: ~16 partial rows a load
        USE_TMA=descs is not None, HAS_CAP=logit_cap is not None,
        KV_FP8=kv_fp8, WIDEN_ASM=not _INTERPRET, Q_FP8=q_fp8, V_SPLIT=v_split, AHEAD=ahead,
        LOOP_STAGES=cfg.get("num_stages", 2), EARLY_TILE=early_tile, **cfg,
        **pdl_options(q), EARLY=EARLY_DEPENDENTS and early_launch(q),
    )
    if merge == "kernel":
        merge_splits_kernel[(num_heads, bs)](
            mid_o, mid_lse, out, num_splits,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, CHUNK_S=min(block_s, 16),
            num_warps=4 if q.is_cuda else 1, **pdl_options(q),
        )
    return out


# an FP8 pool's decode with q rounded to e4m3 and q.K^T on the FP8 matrix units (fp8_kv_tiles.fp8_keys_step).
# H200 2026-12-03 (bench/fp8.py part k, decode_tiles' tiles): bs 64 x 4096 0.1816 vs 0.1999 ms
# (0.71 vs 0.65 of copy), bs 1 x 32k 0.0307 vs 0.0324 ms; but the output's error vs exact q grows
# 2.5e-3 -> 2.6e-2 and SmolLM2's decode KL vs bf16 0.0339 -> 0.0351 (bench/fp8_accuracy.py "kvq").
# Off by default: 5-10% for ten times the attention error; SGLITE_FP8_Q_PRODUCT=1 turns it on.
FP8_Q_PRODUCT = os.environ.get("SGLITE_FP8_Q_PRODUCT", "0") == "1"
# tiles["v_split"]'s default on an FP8 pool. H200 2026-12-04 (bench/fp8.py part k, same call): bs 64 x
# 4096 0.1998 ms (0.64 of copy) -> 0.1667 (v_split 3, old tiles) -> 0.1508 (0.85; with decode_tiles'
# FP8 pick: 3 stages, TMA); bs 1 x 32k 0.0373 -> 0.0265 ms (32 splits, 128 keys); offline 1024 x
# (512 in, 256 out) with FP8 weights + KV 15747 -> 16377 tok/s (old tiles otherwise). Same arithmetic
# (the fp16 widening is exact), columns in another order. SGLITE_FP8_V_SPLIT=0: the old kernel.
FP8_V_SPLIT = int(os.environ.get("SGLITE_FP8_V_SPLIT", "3"))
# the split kernel lets the next launch (the o projection) start right after its wait (pdl.py; a
# PDL launch such as the one-row GEMV then loads its weights meanwhile; cuBLAS is not one).
# SGLITE_DECODE_EARLY=0 turns it off (read at call time: benchmarks flip it)
EARLY_DEPENDENTS = os.environ.get("SGLITE_DECODE_EARLY", "1") != "0"
# early_tile=True (the caller's choice): the split's first K/V tile gathered before the PDL wait
# (decode_key_loops.tile_rows), so that its DRAM latency overlaps the kernel before, which stored
# only the new token's row (read again after the wait); 16-bit pools, split launches. It pays where
# that kernel is long and lets this one launch early: Gemma's one-row qkv GEMV (H200 2026-12-04,
# Gemma-2-9B bs 1 graph replay 5.318 -> 5.216-5.225 ms, bench/decode_floor.py --variant-set ninth,
# same runner; 5.293 -> 5.169 in processes of one call). Not after a short one: Llama-3-8B bs 1
# (cuBLAS qkv, then the rotary kernel) replay 4.219 -> 4.244 ms; nor alone (back-to-back launches,
# bench/decode_read_ceiling.py: bs 1 x 32k 39.3 -> 39.9 us, 8 x 2048 22.0 -> 22.3) nor for one-split
# batches (bs 64 x 4096 251 -> 425 us: the tile is held in registers through the wait, 94 -> 172 of
# them at d 128). SGLITE_DECODE_EARLY_TILE=0 turns it off everywhere (read at call time: benchmarks flip it)
EARLY_TILE = os.environ.get("SGLITE_DECODE_EARLY_TILE", "1") != "0"
TMA_ENABLED = os.environ.get("SGLITE_TMA", "1") != "0"  # SGLITE_TMA=0: gathers only (benchmarks)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline asm there (fp8_kv_tiles.widen_pairs)


def _descriptors(k_buffer: torch.Tensor, v_buffer: torch.Tensor, block_n: int) -> tuple | None:
    """Host TMA descriptors of the K and V pools seen as [slots, KV heads * head_dim] with
    [block_n, head_dim] boxes (one KV head's rows of a tile), or None where the kernel must gather
    every tile: no Hopper GPU (the interpreter emulates them, so CI runs this path), SGLITE_TMA=0,
    or a pool whose rows are not dense and 16-byte aligned. Made per call (~1.5 us each; a CUDA
    graph keeps those it was captured with): a cache would keep dead pools alive."""
    num_slots, num_kv_heads, head_dim = k_buffer.shape
    if not (TMA_ENABLED and TensorDescriptor is not None and _tma_device(k_buffer.device)):
        return None
    if head_dim != triton.next_power_of_2(head_dim) or head_dim * k_buffer.element_size() < 16:
        return None
    for buf in (k_buffer, v_buffer):
        if buf.stride() != (num_kv_heads * head_dim, head_dim, 1) or buf.data_ptr() % 16:
            return None
    shape, strides = [num_slots, num_kv_heads * head_dim], [num_kv_heads * head_dim, 1]
    k_desc = TensorDescriptor(k_buffer, shape, strides, [block_n, head_dim])
    if v_buffer.dtype == torch.float8_e4m3fn:  # FP8 values as int16 pairs (fp8_kv_tiles.fp8_values_step)
        half = num_kv_heads * head_dim // 2
        return k_desc, TensorDescriptor(v_buffer.view(torch.int16), [num_slots, half], [half, 1],
                                        [block_n, head_dim // 2])
    return k_desc, TensorDescriptor(v_buffer, shape, strides, [block_n, head_dim])


def _tma_device(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(q, k_buffer, v_buffer, out, num_splits) -> None:
    check_attention_shapes(q, k_buffer, v_buffer, out, q_layout="[bs, H, D]")
    if any(t.stride(-1) != 1 for t in (q, k_buffer, v_buffer, out)):
        raise ValueError("q, out and the K/V buffers need a contiguous last (head_dim) axis")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
