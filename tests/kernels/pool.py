"""Test scenarios: a paged KV pool with requests scattered over random slots.

Slot 0 (the padding slot) holds NaN, and slots of positions no query of the batch can see
(outside the sliding window, not global) are freed to slot 0 in req_to_token, as issue 7 does;
a kernel that reads a masked position therefore poisons its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the interpreter on a CPU; compiled kernels on a GPU, where fp32 dots run in tf32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 5e-3


@dataclass
class Scenario:
    q: torch.Tensor  # [T, H, D]
    k_new: torch.Tensor  # [T, KH, D]
    v_new: torch.Tensor
    k_buffer: torch.Tensor  # [slots, KH, D], new K already stored
    v_buffer: torch.Tensor
    req_to_token: torch.Tensor  # [max_reqs, max_context] int32
    rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    out_cache_loc: torch.Tensor  # [T] int64
    scale: float

    def tensor(self, values, dtype=torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.q.device)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    @property
    def extend_start_loc(self) -> torch.Tensor:
        starts = [sum(self.extend_lens[:i]) for i in range(len(self.extend_lens))]
        return self.tensor(starts)


def make_scenario(
    prefix_lens, extend_lens, *, num_heads, num_kv_heads, head_dim, sliding_window=None,
    global_tokens=0, dtype=torch.float32, device=DEVICE, seed=0, page_size=None,
) -> Scenario:
    """page_size: requests hold whole pages of that many consecutive slots (pages in random
    order), as the runtime's pool hands them out on a GPU; None: every token on a random slot."""
    gen = torch.Generator().manual_seed(seed)
    bs = len(prefix_lens)
    total = sum(prefix_lens) + sum(extend_lens)
    num_slots = total + 8
    if page_size is not None:
        pages_per_req = [-(-(p + e) // page_size) for p, e in zip(prefix_lens, extend_lens)]
        num_slots = (sum(pages_per_req) + 2) * page_size  # page 0 holds the padding slot
    max_context = max(p + e for p, e in zip(prefix_lens, extend_lens)) + 3

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    k_buffer = randn(num_slots, num_kv_heads, head_dim)
    v_buffer = randn(num_slots, num_kv_heads, head_dim)
    k_buffer[0] = float("nan")
    v_buffer[0] = float("nan")
    rows = torch.randperm(bs + 2, generator=gen)[:bs].tolist()
    slots = (torch.randperm(num_slots - 1, generator=gen) + 1)[:total]
    if page_size is not None:
        pages = torch.randperm(num_slots // page_size - 1, generator=gen) + 1
        runs, first = [], 0
        for row_pages, p, e in zip(pages_per_req, prefix_lens, extend_lens):
            page_ids = pages[first : first + row_pages]
            runs.append((page_ids[:, None] * page_size + torch.arange(page_size)).flatten()[: p + e])
            first += row_pages
        slots = torch.cat(runs)
    req_to_token = torch.zeros(bs + 2, max_context, dtype=torch.int32)
    start, locs = 0, []
    for row, prefix_len, extend_len in zip(rows, prefix_lens, extend_lens):
        seq_len = prefix_len + extend_len
        req_to_token[row, :seq_len] = slots[start : start + seq_len].int()
        locs.append(req_to_token[row, prefix_len:seq_len].long())
        if sliding_window is not None:  # the batch's first query sits at prefix_len
            req_to_token[row, global_tokens : max(prefix_len - sliding_window + 1, global_tokens)] = 0
        start += seq_len
    num_tokens = sum(extend_lens)
    out_cache_loc = torch.cat(locs).to(device)
    k_new = randn(num_tokens, num_kv_heads, head_dim)
    v_new = randn(num_tokens, num_kv_heads, head_dim)
    k_buffer[out_cache_loc] = k_new
    v_buffer[out_cache_loc] = v_new
    return Scenario(
        q=randn(num_tokens, num_heads, head_dim), k_new=k_new, v_new=v_new,
        k_buffer=k_buffer, v_buffer=v_buffer, req_to_token=req_to_token.to(device), rows=rows,
        prefix_lens=list(prefix_lens), extend_lens=list(extend_lens), out_cache_loc=out_cache_loc,
        scale=head_dim**-0.5,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
