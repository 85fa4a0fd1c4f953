"""Plain-torch versions of the kernels; the tests compare the Triton kernels against them.

Everything is computed per request in float32 (or the input's dtype when that is float64), reading
K/V through `req_to_token`. Keys a query cannot see are zeroed before use, so garbage (even NaN) in
the padding slot 0 or in freed slots outside a sliding window never reaches the result.

Visibility (Longformer-style window in a causal decoder): a query at position p sees key j iff
j <= p and (W is None or p - W < j or j < G).
"""

from __future__ import annotations

import torch


def visible_mask(
    q_pos: torch.Tensor,  # [nq] int64
    k_pos: torch.Tensor,  # [nk] int64
    *,
    sliding_window: int | None,
    global_tokens: int = 0,
) -> torch.Tensor:  # [nq, nk] bool
    q = q_pos[:, None]
    k = k_pos[None, :]
    mask = k <= q
    if sliding_window is not None:
        mask &= (k > q - sliding_window) | (k < global_tokens)
    return mask


def _attend_one(q, k, v, mask, scale, logit_cap=None):
    """q [nq, H, D], k/v [nk, KH, D], mask [nq, nk] -> [nq, H, D] float; logit_cap: scores
    s -> cap * tanh(s / cap) (Gemma 2)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    # zero keys nobody may see, so that NaN garbage in unread slots cannot leak through 0 * NaN
    seen = mask.any(0)
    k = torch.where(seen[:, None, None], k.to(dt), 0.0).repeat_interleave(group, dim=1)
    v = torch.where(seen[:, None, None], v.to(dt), 0.0).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dt), k) * scale
    if logit_cap is not None:
        scores = torch.tanh(scores / logit_cap) * logit_cap
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def extend_attention_ref(
    q: torch.Tensor,  # [num_tokens, H, D], new tokens packed request by request
    k_buffer: torch.Tensor,  # [num_slots, KH, D], new K already stored
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,  # [max_reqs, max_context] int
    req_pool_indices: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    *,
    scale: float,
    sliding_window: int | None = None,
    global_tokens: int = 0,
    logit_cap: float | None = None,
) -> torch.Tensor:  # [num_tokens, H, D] in q's dtype
    out = torch.empty_like(q)
    start = 0
    for row, prefix_len, extend_len in zip(req_pool_indices, prefix_lens, extend_lens):
        seq_len = prefix_len + extend_len
        slots = req_to_token[row, :seq_len].long()
        q_pos = torch.arange(prefix_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = visible_mask(q_pos, k_pos, sliding_window=sliding_window, global_tokens=global_tokens)
        end = start + extend_len
        out[start:end] = _attend_one(q[start:end], k_buffer[slots], v_buffer[slots], mask, scale,
                                       logit_cap).to(q.dtype)
        start = end
    return out


def decode_attention_ref(
    q: torch.Tensor,  # [bs, H, D], one query per request at position seq_len - 1
    k_buffer: torch.Tensor,  # [num_slots, KH, D]
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    seq_lens: list[int],
    *,
    scale: float,
    sliding_window: int | None = None,
    global_tokens: int = 0,
    logit_cap: float | None = None,
) -> torch.Tensor:  # [bs, H, D]
    return extend_attention_ref(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices,
        [n - 1 for n in seq_lens], [1] * len(seq_lens),
        scale=scale, sliding_window=sliding_window, global_tokens=global_tokens, logit_cap=logit_cap,
    )


def store_kv_ref(k_buffer, v_buffer, loc, k, v) -> None:
    """k/v [num_tokens, KH, D] written at k_buffer[loc], v_buffer[loc]."""
    k_buffer[loc] = k
    v_buffer[loc] = v


def unpack_decode_batch_ref(staged, fed_ids, req_to_token) -> dict[str, torch.Tensor]:
    """decode_batch.unpack_decode_batch in plain indexing: the forward's tensors by name; writes
    the real rows' slots into req_to_token."""
    token, source, position, row, seq_len, slot = staged
    fed = source >= 0
    ids = token.clone()
    ids[fed] = fed_ids[source[fed]]
    real = slot >= 0
    req_to_token[row[real], position[real]] = slot[real].to(req_to_token.dtype)
    return dict(input_ids=ids, positions=position.clone(), rows=row.clone(),
                seq_lens=seq_len.to(torch.int32), prefix_lens=position.to(torch.int32),
                out_cache_loc=slot.clamp(min=0))


def top_k_top_p_filter_ref(probs, top_ks, top_ps) -> torch.Tensor:
    """top_k_top_p.top_k_top_p_filter by a stable descending sort: keep rank r (from 0) while
    r < k and (top_p >= 1 or the mass ranked before it <= top_p); zero the rest. (top_p = 1 must
    not cut: a float32 cumulative sum over 128k probabilities passes 1.0 well before the end.)"""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    top_ps = top_ps.view(-1, 1)
    drop = (rank >= top_ks.view(-1, 1)) | ((sorted_probs.cumsum(-1) - sorted_probs > top_ps) & (top_ps < 1))
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
