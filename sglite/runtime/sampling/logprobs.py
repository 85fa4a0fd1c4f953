"""Logprobs of many rows in a few batched ops and one device-to-host copy.

The per-token way (`float(row[token_id])`, a `topk` per row) waits for the GPU once per token:
a 20-token choice of a select costs 40 syncs. Here a whole forward's rows are gathered together:
one log_softmax over the rows that want logprobs, one gather of the chosen ids, one `topk` at the
largest k asked, packed into one tensor that crosses to the host in one copy. The overlapped
decode packs on the device (`pack_logprobs`) and reads the pack one step later with its tokens
(`unpack_logprobs`)."""

from __future__ import annotations

import torch

from sglite.runtime.executor.transfer import tensor_async

Logprobs = tuple[list[float], list[list[tuple[float, int]]]]  # chosen per row, top (logprob, id) per row


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] raw, any float dtype -> fp32 logprobs (a new tensor: later in-place
    sampling ops on logits leave it alone)."""
    return torch.log_softmax(logits.float(), dim=-1)


def pack_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """logprobs [n, vocab] fp32, token_ids [n] int64 on the same device -> [n, 1 + 2k] fp32:
    the chosen token's logprob, the top k logprobs, their ids (exact in fp32 below 2**24)."""
    parts = [logprobs.gather(1, token_ids.view(-1, 1).to(torch.int64))]
    k = min(top_k, logprobs.shape[1])
    if k > 0:
        values, top_ids = logprobs.topk(k, dim=-1)
        parts += [values, top_ids.to(torch.float32)]
    return torch.cat(parts, dim=1)


def unpack_logprobs(host: torch.Tensor, top_nums: list[int]) -> Logprobs:
    """host: a pack_logprobs result on the CPU; top_nums [n]: how many of the top each row keeps."""
    n = host.shape[0]
    k = (host.shape[1] - 1) // 2
    chosen = host[:, 0].tolist()
    if k == 0:
        return chosen, [[] for _ in range(n)]
    values = host[:, 1: 1 + k].tolist()
    ids = host[:, 1 + k:].to(torch.int64).tolist()
    return chosen, [list(zip(v[:m], i[:m])) for v, i, m in zip(values, ids, top_nums)]


def pack_rows(logits: torch.Tensor, token_ids: list[int], top_nums: list[int]) -> torch.Tensor:
    """gather_logprobs' device half: logits [n, vocab] raw -> its pack_logprobs result, still on
    the device (no copy here waits for the GPU)."""
    assert len(token_ids) == logits.shape[0] == len(top_nums), (logits.shape, len(token_ids), len(top_nums))
    ids = tensor_async(token_ids, torch.int64, logits.device)
    return pack_logprobs(log_softmax_rows(logits), ids, max(top_nums))


def gather_logprobs(logits: torch.Tensor, token_ids: list[int], top_nums: list[int]) -> Logprobs:
    """logits [n, vocab] (raw), token_ids [n] (the token each row scores), top_nums [n] (k of
    each row's top logprobs; 0: none). Returns the chosen token's logprob per row and each row's
    top k as (logprob, id) pairs, best first."""
    if logits.shape[0] == 0:
        return [], []
    return unpack_logprobs(pack_rows(logits, token_ids, top_nums).cpu(), top_nums)  # one copy back
