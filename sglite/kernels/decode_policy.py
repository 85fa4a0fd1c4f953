"""Decode attention's launch policy: how many splits a request's keys get (decode_num_splits) and
the tile table of the stage-1 kernel (decode_tiles), each with the measurements behind it.
decode_attention.py's launcher and the attention backend (which sizes the split scratch and the
CUDA graphs' splits) read them."""

from __future__ import annotations

import torch
import triton

MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 128  # H200, bs 1, W=4096, 128-key tiles: 16 splits 0.0140 ms, 33 of 128 keys 0.0134


def decode_num_splits(batch_size: int, num_kv_heads: int, *, num_sms: int, max_kv_len: int | None = None) -> int:
    """KV splits per request: enough for ~2 (split, KV head, request) programs per SM, never more
    (128-key tiles hold 2 programs per SM, so more would run in a second wave). H200, bs 1 x 32768,
    128-key tiles, fused merge: 32 splits 0.0444 ms, 48: 0.0465, 64: 0.0504, 16: 0.0538. A batch
    with >= 2 programs per SM needs none (bs 64 x 8 KV heads x 4096: 1 split 0.257 ms, 2: 0.268).
    At most MAX_SPLITS; when the longest visible context is known, at least MIN_SPLIT_TOKENS keys
    each, and only as many splits as whole MIN_SPLIT_TOKENS tiles leave non-empty (33 -> 32 at 32k)."""
    programs = batch_size * num_kv_heads
    splits = max(1, min(2 * num_sms // programs, MAX_SPLITS))
    if max_kv_len is not None and splits > 1:
        splits = max(1, min(splits, triton.cdiv(max_kv_len, MIN_SPLIT_TOKENS)))
        split_len = triton.cdiv(triton.cdiv(max_kv_len, splits), MIN_SPLIT_TOKENS) * MIN_SPLIT_TOKENS
        splits = triton.cdiv(max_kv_len, split_len)
    return splits


def decode_tiles(head_dim: int, *, device: torch.device, num_splits: int = 1, kv_fp8: bool = False) -> dict:
    """The one tile table of decode attention's stage-1 kernel: BLOCK_N keys per step, warps, pipeline depth, and how
    the splits merge ("fused" into the split kernel, or "kernel": a second launch).
    H200, d=128, random slots (bench/kernels.py --sweep): one split, 64 keys, 4 warps, 2 stages
    reads 4130-4170 GB/s at bs 64 x 4096 (copy: 4240 GB/s read + write; 128 keys: 3610); the fused
    merge 0.0444 vs 0.0457 ms in a second kernel (bs 1 x 32768). Split launches of a 16-bit pool
    take 64 keys and 3 stages (H200 2026-12-04, bench/decode_read_ceiling.py, same call, us and
    share of copy, 64 keys 3 stages vs 128 keys 2 stages: bs 1 x 32768 40.0 (0.84) vs 46.7 (0.72),
    4 x 8192 39.4 (0.85) vs 46.0 (0.73), 8 x 2048 22.5 (0.74) vs 25.6 (0.66), 16 x 1024 22.5 (0.75)
    vs 25.5 (0.66), 1 x 4096 10.7 vs 11.0; the 2026-11 sweep had found 128 keys best); an FP8
    pool's split launches keep 128 keys (64 keys: 0.48 vs 0.62 at 1 x 32768) and take their
    tiles' first slots 16 ahead with 4 stages (tiles["ahead"]: three K / V buffers; H200
    2026-12-04, bench/decode_read_ceiling.py, two calls, us vs 2 stages without: 1 x 32768 24.5 /
    24.4 vs 27.5 / 27.5, 1 x 65536 41.8 / 41.2 vs 48.7 / 48.6, 1 x 16384 15.9 vs 16.8, 1 x 8192
    11.4 / 11.2 vs 11.4 / 11.4, 1 x 4096 8.7 vs 8.7; a context sweep there: the streaming rate
    3.2 -> 3.9 TB/s, the fixed ~7 us a launch unchanged).
    An FP8 pool (kv_fp8) with one split takes 3 stages: the K/V tile has one buffer at any depth
    (triton 3.6 pipelines the slot ids, on which the tile's addresses depend, as a stage of their
    own), so a third stage moves the slot ids' load off the tile's critical path; with half the
    bytes a tile, FP8 needs that where bf16 did not (H200 2026-12-04, bs 64 x 4096, v_split 3: 2
    stages 0.1562 ms, 3 stages 0.1508, both TMA; bench/fp8.py part k)."""
    if device.type != "cuda":  # interpreter: small tiles so that tiny tests still take several steps
        return dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused")
    if head_dim <= 128:
        if num_splits > 1 and kv_fp8:
            return dict(BLOCK_N=128, num_warps=4, num_stages=4, merge="fused", ahead=16)
        stages = 3 if kv_fp8 or num_splits > 1 else 2
        return dict(BLOCK_N=64, num_warps=4, num_stages=stages, merge="fused")
    # head_dim 256 (Gemma): 32-key tiles. 16-key tiles for split launches spread a short request
    # over twice the splits (Gemma-2-9B bs 1 at ~130-440 tokens, H200 2026-12-04: graph replay
    # 5.287 -> 5.241 ms) but cost more than that at real contexts (bench/decode_floor.py
    # --attn-sweep, bs 1, 32 splits, us a call, 32 vs 16 keys: 8.2 vs 8.5 at 1024 keys, 14.6 vs
    # 18.5 at 4096, 28.1 vs 38.1 at 8192; splits of 16-key runs over 32-key tiles were no better
    # than plain 32 at short contexts and 10-20% slower at long ones)
    return dict(BLOCK_N=32, num_warps=4, num_stages=2, merge="fused")
