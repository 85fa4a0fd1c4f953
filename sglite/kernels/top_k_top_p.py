"""top-k / top-p filtering of a batch of probability rows without sorting them.

The sampler keeps, in each row, the tokens ranked 1..r by probability (ties ranked by token id,
as a stable descending sort ranks them), where r = min(k, r_p) and r_p is the first rank whose
cumulative probability exceeds top_p (the smallest set whose mass exceeds top_p; the top token
always stays). Sorting 128k probabilities per row cost more than the rest of sampling together
(H200, bs 64: the sort-based filter 1.1 ms of 1.35 ms; docs/benchmarks.md).

Here the probability tau of rank r is searched for instead: with cnt(v) = #{p >= v} and
mass(v) = the sum of the p >= v, the k-th probability is the largest v with cnt(v) >= k, the
r_p-th the largest v with mass(v) > top_p, and tau the larger: the largest v for which either
holds. Non-negative floats order as their int32 bit patterns, so the search runs over bit
patterns, in an interval [lo, hi) where either condition holds at lo and neither at hi. A first
pass counts the tokens of each float exponent, which brackets tau within a few powers of two; each
further pass tests NC thresholds spread over the interval, which shrinks NC + 1 times. Passes read
the whole row until at most CAP tokens lie inside the interval; those are then copied to the front of the output row, tokens
above it counted once, and the remaining passes read only the copies. Every p > tau is kept and,
of the tokens with p == tau, the first m by token id, m as many as ranks 1..r leave them.

One program per row. Mass sums run in another order than a sort's cumulative sum, so a row whose
cumulative mass lands within float rounding of top_p may keep one token more or less than a
sort-based filter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_TOP_K = 1 << 30  # a top_k that keeps every token
ONE_BITS = tl.constexpr(0x3F800000)  # bit pattern of 1.0, the largest probability
# tokens per step, thresholds per pass, tokens copied, warps. H200, sweeps of 7 tiles (docs/
# benchmarks.md, fifth session), bench/sampling.py: one row 0.27-0.33 ms, 64 rows 0.30-0.35, 256
# rows 0.62-0.69; 16 warps, 16k copies, 2 or 8 thresholds a pass: no better
TILE = dict(BLOCK=4096, NC=4, CAP=4096, num_warps=8)
SEARCH_PASSES = 16  # per loop; 5^14 > 2^30 (the bit patterns of [0, 1]), plus rounding of the spread


@triton.jit
def _count_and_mass(ptr, n, cand, BLOCK: tl.constexpr):
    """For each threshold bit pattern in cand [NC]: #{p >= it} and their sum over ptr[:n], [NC]
    each. Lanes accumulate and reduce once, so the loop only loads, compares and adds."""
    count = tl.zeros((cand.shape[0], BLOCK), dtype=tl.int32)
    mass = tl.zeros((cand.shape[0], BLOCK), dtype=tl.float32)
    p_next = tl.load(ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < n, other=-1.0)
    for start in range(0, n, BLOCK):
        p = p_next  # the next step's load is in flight while this one is counted
        offs_next = start + BLOCK + tl.arange(0, BLOCK)
        p_next = tl.load(ptr + offs_next, mask=offs_next < n, other=-1.0)
        hit = p.to(tl.int32, bitcast=True)[None, :] >= cand[:, None]  # -1.0's bits are < 0
        count += hit.to(tl.int32)
        mass += tl.where(hit, p[None, :], 0.0)
    return tl.sum(count, axis=1), tl.sum(mass, axis=1)


@triton.jit
def _narrow(lo, hi, cnt_lo, cnt_hi, ptr, n, base_cnt, base_mass, k, mass_limit, NC: tl.constexpr,
            BLOCK: tl.constexpr):
    """One pass: test NC thresholds in (lo, hi) on ptr[:n] (plus base_cnt tokens of base_mass
    above them all); the narrowed interval and the counts at its ends."""
    j = tl.arange(1, NC + 1).to(tl.int64)
    cand = lo + ((hi - lo) * j) // (NC + 1)
    count, mass = _count_and_mass(ptr, n, cand.to(tl.int32), BLOCK)
    count += base_cnt
    mass += base_mass
    ok = (count >= k) | (mass > mass_limit)  # a prefix of the thresholds (both fall as v grows)
    new_lo = tl.maximum(lo, tl.max(tl.where(ok, cand, lo), axis=0))
    new_hi = tl.minimum(hi, tl.min(tl.where(ok, hi, cand), axis=0))
    new_cnt_lo = tl.minimum(cnt_lo, tl.min(tl.where(ok, count, cnt_lo), axis=0))
    new_cnt_hi = tl.maximum(cnt_hi, tl.max(tl.where(ok, cnt_hi, count), axis=0))
    return new_lo, new_hi, new_cnt_lo, new_cnt_hi


@triton.jit
def _top_k_top_p_kernel(Probs, Out, TopK, TopP, vocab, stride_p, stride_o,
                        BLOCK: tl.constexpr, NC: tl.constexpr, CAP: tl.constexpr,
                        SEARCH_PASSES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = Probs + row * stride_p
    out_ptr = Out + row * stride_o  # also holds the copies of the tokens inside the interval
    k = tl.minimum(tl.load(TopK + row), vocab).to(tl.int32)
    top_p = tl.load(TopP + row)
    mass_limit = tl.where(top_p < 1.0, top_p, 2.0)  # top_p off: no mass (sums ~1) exceeds 2

    # bracket tau by binades first: one pass counts the tokens of each float exponent e (values
    # in [2^(e-127), 2^(e-126))), which gives cnt at each power of two exactly and its mass within
    # a factor of 2; the last power of two where a condition surely holds is lo, the first where
    # neither can is hi (bounds padded by float rounding)
    e = tl.arange(0, 256)
    hist = tl.zeros((256,), dtype=tl.int32)
    p_next = tl.load(row_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < vocab, other=1.0)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = p_next  # (each loop over the row loads one step ahead)
        p_next = tl.load(row_ptr + offs + BLOCK, mask=offs + BLOCK < vocab, other=1.0)
        exponent = tl.where(offs < vocab, p.to(tl.int32, bitcast=True) >> 23, 255)  # 0..127 for p in [0, 1]
        hist += tl.histogram(exponent, 256)
    hist = tl.where(e < 128, hist, 0)
    cnt_at = tl.cumsum(hist, axis=0, reverse=True)  # #{p >= 2^(e-127)}; e = 0: every token
    low_mass = tl.cumsum(hist.to(tl.float32) * tl.exp2((tl.minimum(e, 127) - 127).to(tl.float32)), axis=0,
                         reverse=True)  # a lower bound of the mass of the p >= 2^(e-127)
    surely = (e < 128) & ((cnt_at >= k) | (low_mass * (1 - 1e-5) > mass_limit))
    never = (e >= 1) & (e < 128) & (cnt_at < k) & (2 * low_mass * (1 + 1e-5) <= mass_limit)
    lo_e = tl.max(tl.where(surely, e, 0), axis=0)
    hi_e = tl.min(tl.where(never, e, 128), axis=0)
    lo = (lo_e << 23).to(tl.int64)
    hi = tl.where(hi_e < 128, hi_e << 23, ONE_BITS + 1).to(tl.int64)
    cnt_lo = tl.sum(tl.where(e == lo_e, cnt_at, 0), axis=0)  # tokens >= lo and >= hi
    cnt_hi = tl.sum(tl.where(e == hi_e, cnt_at, 0), axis=0)
    zero_cnt = tl.zeros((), dtype=tl.int32)
    zero_mass = tl.zeros((), dtype=tl.float32)
    for _ in range(SEARCH_PASSES):  # on the whole row while the interval holds > CAP tokens
        if (hi - lo > 1) & (cnt_lo - cnt_hi > CAP):
            lo, hi, cnt_lo, cnt_hi = _narrow(lo, hi, cnt_lo, cnt_hi, row_ptr, vocab, zero_cnt,
                                             zero_mass, k, mass_limit, NC, BLOCK)
    # copy the tokens inside [lo, hi) to the front of the output row, in token order; count the
    # mass above hi once
    lo_bits, hi_bits = lo.to(tl.int32), hi.to(tl.int32)
    n_in = tl.zeros((), dtype=tl.int32)
    base_mass = tl.zeros((BLOCK,), dtype=tl.float32)
    p_next = tl.load(row_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < vocab, other=-1.0)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = p_next
        p_next = tl.load(row_ptr + offs + BLOCK, mask=offs + BLOCK < vocab, other=-1.0)
        bits = p.to(tl.int32, bitcast=True)
        inside = (bits >= lo_bits) & (bits < hi_bits)
        num_inside = tl.sum(inside.to(tl.int32), axis=0)
        if num_inside > 0:  # the scan for their places only where there are some
            tl.store(out_ptr + n_in + tl.cumsum(inside.to(tl.int32), axis=0) - 1, p, mask=inside)
            n_in += num_inside
        base_mass += tl.where(bits >= hi_bits, p, 0.0)
    base_cnt = cnt_hi
    base = tl.sum(base_mass, axis=0)
    tl.debug_barrier()  # the copies are read by other threads of this program
    for _ in range(SEARCH_PASSES):  # the rest of the search on the copies
        if hi - lo > 1:
            lo, hi, cnt_lo, cnt_hi = _narrow(lo, hi, cnt_lo, cnt_hi, out_ptr, n_in, base_cnt, base,
                                             k, mass_limit, NC, BLOCK)
    tau_bits = lo.to(tl.int32)
    tau = tau_bits.to(tl.float32, bitcast=True)
    at_tau = tl.zeros((2,), dtype=tl.int32) + tau_bits + tl.arange(0, 2)  # p >= tau, p > tau
    n_ge, mass_ge = _count_and_mass(out_ptr, n_in, at_tau, BLOCK)
    n_gt = tl.sum(tl.where(tl.arange(0, 2) == 1, n_ge, 0), axis=0) + base_cnt
    n_tie = tl.sum(tl.where(tl.arange(0, 2) == 0, n_ge, 0), axis=0) + base_cnt - n_gt
    mass_gt = tl.sum(tl.where(tl.arange(0, 2) == 1, mass_ge, 0.0), axis=0) + base
    # how many ties at tau ranks 1..r take: top_k's, and top_p's (the j-th tie has mass
    # mass_gt + (j - 1) tau ranked before it, kept while <= top_p); at least one
    m = k - n_gt
    if top_p < 1.0:
        if tau > 0:
            m_p = tl.minimum(tl.floor((top_p - mass_gt) / tau), vocab).to(tl.int32) + 1
            m = tl.minimum(m, m_p)
    m = tl.maximum(m, 1)
    tl.debug_barrier()  # every thread has read the copies before the output overwrites them

    ties_before = tl.zeros((), dtype=tl.int32)
    p_next = tl.load(row_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < vocab, other=0.0)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        p = p_next
        p_next = tl.load(row_ptr + offs + BLOCK, mask=offs + BLOCK < vocab, other=0.0)
        bits = p.to(tl.int32, bitcast=True)
        if m >= n_tie:  # every tie at tau is kept (the rule): no ranks to count
            keep = bits >= tau_bits
        else:
            tie = mask & (bits == tau_bits)
            tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), axis=0) - 1  # among the ties, by id
            keep = (bits > tau_bits) | (tie & (tie_rank < m))
            ties_before += tl.sum(tie.to(tl.int32), axis=0)
        tl.store(out_ptr + offs, tl.where(keep, p, 0.0), mask=mask)


def top_k_top_p_filter(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, *,
                       tile: dict | None = None) -> torch.Tensor:
    """probs [bs, vocab] float32 (rows of softmax output); top_ks [bs] int (NO_TOP_K or more: off),
    top_ps [bs] float32 (>= 1: off). Returns new [bs, vocab] probabilities, zero where filtered.
    tile: overrides TILE's entries (tests, benchmarks)."""
    if probs.dim() != 2 or probs.dtype != torch.float32 or probs.stride(-1) != 1:
        raise ValueError(f"probs must be [bs, vocab] float32 with a contiguous last axis, got "
                         f"{tuple(probs.shape)} {probs.dtype}")
    bs, vocab = probs.shape
    top_ks, top_ps = top_ks.reshape(-1).contiguous(), top_ps.reshape(-1).to(torch.float32).contiguous()
    if top_ks.numel() != bs or top_ps.numel() != bs:
        raise ValueError(f"top_ks and top_ps need {bs} entries, got {top_ks.numel()} and {top_ps.numel()}")
    out = torch.empty_like(probs)
    if bs == 0:
        return out
    # interpreter: small tiles, and a small CAP so that tiny rows still search on the whole row
    tile = {**(dict(BLOCK=16, NC=4, CAP=8, num_warps=1) if not probs.is_cuda else TILE), **(tile or {})}
    tile["BLOCK"] = min(tile["BLOCK"], triton.next_power_of_2(vocab))
    _top_k_top_p_kernel[(bs,)](probs, out, top_ks, top_ps, vocab, probs.stride(0), out.stride(0),
                               SEARCH_PASSES=SEARCH_PASSES, **tile)
    return out
