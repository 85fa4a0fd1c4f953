"""Fused Mixture-of-Experts: the expert MLPs of all tokens in two grouped-GEMM launches.

Each token picks top_k experts; its (token, slot) pairs are sorted by expert and each expert's
run is padded to a multiple of BLOCK_M (`moe_align_block_size`), so every M tile of a launch
belongs to one expert and reads that expert's weights only. Then:
  1. `gate_up`: A = x [T, H] (row = pair // top_k), B = w13 [E, 2I, H] -> silu(gate) * up [T*k, I]
     (both halves accumulate in one program, the activation is applied before the store);
  2. `down`:    A = that [T*k, I], B = w2 [E, H, I] -> out [T*k, H], scaled by the pair's router
     weight in the kernel; the k rows of a token are summed by one torch op (deterministic,
     unlike atomic adds).
Everything is sized from T alone (padding bound T*k + E*(BLOCK_M - 1), tiles past the real
padded length exit at once), so no host sync is needed and decode steps can be graph-captured.

`fused_moe_reference` is the plain-torch per-expert loop of transformers' MoE blocks, which the
tests and the CPU executor use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# the one-launch align kernel below up to this many (token, slot) pairs (one program walks them
# all, 64 at a time); past it the torch ops. H200, Qwen3-30B-A3B routing, one call per layer in a
# CUDA graph (bench/moe.py, 2026-12-02): 8 pairs 4.9 vs 39.9 us, 512 pairs 24.3 vs 74.9 us,
# 2048 pairs 82.2 vs 80.1 us (a tie: the single program's serial chunks)
ALIGN_KERNEL_MAX_PAIRS = 1024
# SGLITE_MOE_ALIGN=torch: the torch ops at every size (the before of benchmarks; read at import)
ALIGN_KERNEL = os.environ.get("SGLITE_MOE_ALIGN", "kernel") != "torch"


@triton.jit
def _fused_moe_kernel(
    A, B, C, TopkWeights, SortedIds, ExpertIds, NumPostPadded,
    N, K, EM, num_valid,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr,  # a sorted pair p reads A row p // A_ROW_DIV (top_k, or 1)
    GATED: tl.constexpr,  # B rows [0, N) gate and [N, 2N) up: C = silu(A @ gate.T) * (A @ up.T)
    MUL_WEIGHT: tl.constexpr,  # C row p *= TopkWeights[p]
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M M tiles share each B tile while it is in L2
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size
    if pid_m * BLOCK_M >= tl.load(NumPostPadded):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedIds + offs_m).to(tl.int64)  # padding holds num_valid
    mask_m = pair < num_valid
    expert = tl.load(ExpertIds + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_bn = offs_n % N  # in-bounds loads; the masked store drops the wrapped columns
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + (pair // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_k[:, None], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_ty = C.dtype.element_ty
    if GATED:  # rounded as F.silu(gate) * up rounds: gate, up, silu and the product in out_ty
        gate = acc.to(out_ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
        acc = act * acc_up.to(out_ty).to(tl.float32)
    if MUL_WEIGHT:
        w = tl.load(TopkWeights + pair, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc.to(out_ty).to(tl.float32) * w[:, None]
    c_ptrs = C + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(out_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _moe_align_kernel(
    TopkIds, SortedIds, ExpertIds, NumPostPadded, n, num_experts, em,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: what moe_align_block_size_torch computes, in one launch. Pass 1 counts the
    pairs of each expert (one-hot sums over chunks of CHUNK pairs); the padded runs' ends are
    their cumulative sum; each block's expert is the number of runs ending at or before it;
    sorted_ids is filled with the padding value n, then (after a barrier: the same program
    overwrites those slots) pass 2 places every pair at its run's start + the pairs of its expert
    before it, in pair order (the stable sort's order)."""
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < num_experts
    offs_c = tl.arange(0, CHUNK)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, n, CHUNK):
        ids = tl.load(TopkIds + start + offs_c, mask=start + offs_c < n, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    run_start = padded_end - padded
    tl.store(NumPostPadded, tl.sum(padded, axis=0))
    num_blocks = em // BLOCK_M
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + offs_c
        ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & mask_e[None, :]
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), num_experts - 1)
        tl.store(ExpertIds + blocks, expert, mask=blocks < num_blocks)
    for p0 in range(0, em, CHUNK):
        tl.store(SortedIds + p0 + offs_c, tl.full([CHUNK], 0, tl.int32) + n, mask=p0 + offs_c < em)
    tl.debug_barrier()  # the fill's stores before pass 2 overwrites some of them
    placed = tl.zeros([BLOCK_E], dtype=tl.int32)  # pairs of each expert placed so far
    for start in range(0, n, CHUNK):
        pairs = start + offs_c
        ids = tl.load(TopkIds + pairs, mask=pairs < n, other=-1).to(tl.int32)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
        # the pair's slot: its run's start + placed before this chunk + earlier in this chunk
        before = tl.cumsum(onehot, axis=0) - onehot
        dest = tl.sum(onehot * (run_start + placed)[None, :] + onehot * before, axis=1)
        tl.store(SortedIds + dest, pairs.to(tl.int32), mask=pairs < n)
        placed += tl.sum(onehot, axis=0)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """topk_ids [T, k] -> (sorted_ids [EM] int32: pair indices grouped by expert, in pair order
    within each, each group padded to a multiple of block_m with T*k; expert_ids [EM / block_m]
    int32; num_post_padded [1] int32). EM = T*k + min(E, T*k) * (block_m - 1), a bound that
    needs no host sync. One launch (_moe_align_kernel) on CUDA and under the interpreter up to
    ALIGN_KERNEL_MAX_PAIRS pairs, else the torch ops."""
    n = topk_ids.numel()
    runs_kernel = topk_ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not (ALIGN_KERNEL and runs_kernel and 0 < n <= ALIGN_KERNEL_MAX_PAIRS):
        return moe_align_block_size_torch(topk_ids, block_m, num_experts)
    em = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    dev = topk_ids.device
    sorted_ids = torch.empty(em, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(em // block_m, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    _moe_align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_ids, expert_ids, num_post, n, num_experts, em,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=64,
        num_warps=4 if topk_ids.is_cuda else 1,
    )
    return sorted_ids, expert_ids, num_post


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """moe_align_block_size in torch ops (~17 launches)."""
    flat = topk_ids.reshape(-1).long()
    n, dev = flat.numel(), flat.device
    em = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    start = counts.cumsum(0) - counts
    sorted_experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(n, device=dev) - start[sorted_experts]
    dest = padded_end[sorted_experts] - padded[sorted_experts] + rank
    sorted_ids = torch.full((em,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, em, block_m, device=dev)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32)


@triton.jit
def _route_kernel(
    Logits, Weights, Ids, num_experts, stride_l,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    """One program per token: softmax over the experts in fp32, the top k by repeated max (the
    lowest expert id among equal probabilities, in descending order as torch.topk returns them),
    renormalised to sum 1 if asked, stored in Weights' dtype; ids as int64."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < num_experts
    x = tl.load(Logits + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = tl.where(mask, p, 0.0)
    p = p / tl.sum(p, 0)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    left = tl.where(mask, p, -1.0)  # probabilities are >= 0: -1 is "taken / no expert"
    for j in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        idx = tl.min(tl.where(left == best, offs, BLOCK_E), 0)
        top_w = tl.where(slots == j, best, top_w)
        top_i = tl.where(slots == j, idx, top_i)
        left = tl.where(offs == idx, -1.0, left)
    if RENORMALIZE:
        top_w = top_w / tl.sum(tl.where(slots < TOP_K, top_w, 0.0), 0)
    keep = slots < TOP_K
    tl.store(Weights + row * TOP_K + slots, top_w.to(Weights.dtype.element_ty), mask=keep)
    tl.store(Ids + row * TOP_K + slots, top_i.to(tl.int64), mask=keep)


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool, dtype: torch.dtype):
    """router_logits [T, E] -> (weights [T, k] in dtype, ids int64 [T, k]) in one launch: what
    layers.moe.select_experts followed by .to(dtype) computes (softmax, topk, renorm, cast: 4-6
    launches), up to exp's last-ulp rounding."""
    num_tokens, num_experts = router_logits.shape
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=dtype, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](
            router_logits, weights, ids, num_experts, router_logits.stride(0),
            TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_E=triton.next_power_of_2(num_experts), RENORMALIZE=renormalize,
            num_warps=1 if num_experts <= 256 else 4,
        )
    return weights, ids


def moe_config(num_tokens: int, *, is_cuda: bool) -> dict:
    """Tiles by token count, for Qwen3-30B-A3B's experts (E=128, I=768, H=2048) on an H200.
    Measured (bench/moe.py, 2026-12-02, do_bench medians incl. launches): at 64 tokens 16x64x128
    tiles 0.68 ms vs 0.76 ms for sglang's 16x256 row; at 4096 tokens 128x256 (GROUP_M 16) 0.95 ms,
    best of five. 65-768 tokens follow sglang's H200 table unmeasured. The gated launch holds two
    accumulators, so `_launch` halves its BLOCK_N. The interpreter runs few, large programs."""
    if not is_cuda:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=1, num_stages=1)
    if num_tokens <= 64:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if num_tokens <= 256:
        return dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=2)
    if num_tokens <= 768:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=3)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk_weights [T, k]
    (any float dtype), topk_ids [T, k] -> [T, H] in x's dtype: sum over the k picks of
    weight * down(silu(gate(x)) * up(x)) of that expert."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)}")
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    cfg = dict(config or moe_config(num_tokens, is_cuda=x.is_cuda))
    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, cfg["BLOCK_M"], num_experts)
    act = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, act, None, sorted_ids, expert_ids, num_post, a_row_div=top_k, gated=True, cfg=cfg)
    out = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _launch(act, w2, out, weights, sorted_ids, expert_ids, num_post, a_row_div=1, gated=False, cfg=cfg)
    return out.view(num_tokens, top_k, hidden).sum(1)


def _launch(a, b, c, topk_weights, sorted_ids, expert_ids, num_post, *, a_row_div, gated, cfg):
    n = b.shape[1] // 2 if gated else b.shape[1]
    k = b.shape[2]
    cfg = dict(cfg)
    if gated and a.is_cuda:
        cfg["BLOCK_N"] = max(32, cfg["BLOCK_N"] // 2)
    em = sorted_ids.numel()
    # a CPU (the interpreter) reads the real padded length: no idle programs; CUDA must not sync
    tiles_m = triton.cdiv(em if a.is_cuda else int(num_post.item()), cfg["BLOCK_M"])
    grid = (tiles_m * triton.cdiv(n, cfg["BLOCK_N"]),)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    _fused_moe_kernel[grid](
        a, b, c, topk_weights if topk_weights is not None else c, sorted_ids, expert_ids, num_post,
        n, k, tiles_m * cfg["BLOCK_M"], c.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, GATED=gated, MUL_WEIGHT=topk_weights is not None,
        DOT_PRECISION=precision, **cfg,
    )


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """transformers' loop: per hit expert, gather its tokens, run the MLP, scale, index_add."""
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros_like(x)
    weights = topk_weights.to(x.dtype)
    hit = torch.zeros(num_experts, dtype=torch.bool, device=x.device)
    hit[topk_ids.reshape(-1)] = True
    for e in hit.nonzero().flatten().tolist():
        rows, slot = torch.where(topk_ids == e)
        h = x[rows]
        gate = F.linear(h, w13[e, :inter])
        up = F.linear(h, w13[e, inter:])
        y = F.linear(F.silu(gate) * up, w2[e]) * weights[rows, slot, None]
        out.index_add_(0, rows, y)
    return out
