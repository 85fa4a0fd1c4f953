"""Unpack a decode batch staged as one int64 block into the tensors a decode forward reads, and
record each new token's KV slot in req_to_token: one launch where torch took ~10 small ops (casts,
an index_put, copies). The decode CUDA graphs start with it, so a decode step costs one
host-to-device copy and one graph launch; an eager decode (past the largest graph, or on the CPU)
stages the same block (`stage_decode_batch`) and unpacks it into new tensors.

The staged block is [6, P] (P rows, pad rows included), one row per field:

    0 token     the input id, from the host
    1 source    -1, or an index into `fed_ids`: the input id is fed_ids[source] instead (a token
                sampled on the device and not read back yet: the overlapped decode)
    2 position  of the new token (= the prefix length)
    3 row       the request's row in req_to_token
    4 seq_len   including the new token
    5 slot      the new token's KV slot, or -1 for a pad row: it then stores its K/V into the
                reserved padding slot 0 and writes nothing into req_to_token
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_options, wait_for_previous
from .reference import unpack_decode_batch_ref

STAGED_FIELDS = 6
PAD_ROW = (0, -1, 0, 0, 1, -1)  # a harmless decode: row 0's first key, K/V into slot 0


def stage_decode_batch(token_ids: list[int], seq_lens: list[int], rows: list[int], slots: torch.Tensor,
                       *, num_rows: int, num_fed: int = 0, fed_index: list[int] | None = None) -> torch.Tensor:
    """The host block [STAGED_FIELDS, num_rows] int64 of a decode batch of len(seq_lens) requests
    (seq_lens include the new token), the rows past them pad rows. The first k requests take their
    input id from the device tokens: fed_ids[fed_index[i]] (k = len(fed_index)), or fed_ids[i]
    without an index (k = num_fed)."""
    bs = len(seq_lens)
    sources = [-1] * bs
    fed = range(num_fed) if fed_index is None else fed_index
    sources[: len(fed)] = fed
    block = torch.empty(STAGED_FIELDS, num_rows, dtype=torch.int64)
    block[:5, :bs] = torch.tensor([token_ids, sources, [s - 1 for s in seq_lens], rows, seq_lens],
                                  dtype=torch.int64)
    block[5, :bs] = slots
    block[:, bs:] = torch.tensor(PAD_ROW, dtype=torch.int64).view(-1, 1)
    return block


@triton.jit
def _unpack_decode_batch_kernel(
    Staged, Fed_ids, Input_ids, Positions, Rows, Seq_lens, Prefix_lens, Out_cache_loc,
    Req_to_token, num_rows, stride_req, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    wait_for_previous(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_rows
    token = tl.load(Staged + offs, mask=mask, other=0)
    source = tl.load(Staged + num_rows + offs, mask=mask, other=-1)
    position = tl.load(Staged + 2 * num_rows + offs, mask=mask, other=0)
    row = tl.load(Staged + 3 * num_rows + offs, mask=mask, other=0)
    seq_len = tl.load(Staged + 4 * num_rows + offs, mask=mask, other=1)
    slot = tl.load(Staged + 5 * num_rows + offs, mask=mask, other=-1)
    fed = mask & (source >= 0)
    token = tl.where(fed, tl.load(Fed_ids + tl.maximum(source, 0), mask=fed, other=0), token)
    tl.store(Input_ids + offs, token, mask=mask)
    tl.store(Positions + offs, position, mask=mask)
    tl.store(Rows + offs, row, mask=mask)
    tl.store(Seq_lens + offs, seq_len.to(tl.int32), mask=mask)
    tl.store(Prefix_lens + offs, position.to(tl.int32), mask=mask)
    tl.store(Out_cache_loc + offs, tl.maximum(slot, 0), mask=mask)
    tl.store(Req_to_token + row * stride_req + position, slot.to(tl.int32), mask=mask & (slot >= 0))


def unpack_decode_batch(
    staged: torch.Tensor,  # [6, P] int64, fields as in the module docstring
    fed_ids: torch.Tensor,  # [>= max source + 1] int64 device tokens
    input_ids: torch.Tensor,  # [P] int64, written
    positions: torch.Tensor,  # [P] int64, written
    rows: torch.Tensor,  # [P] int64, written
    seq_lens: torch.Tensor,  # [P] int32, written
    prefix_lens: torch.Tensor,  # [P] int32, written
    out_cache_loc: torch.Tensor,  # [P] int64, written
    req_to_token: torch.Tensor,  # [max_reqs, max_context] int32, slots written
) -> None:
    num_rows = staged.shape[1]
    if staged.shape != (STAGED_FIELDS, num_rows) or not staged.is_contiguous():
        raise ValueError(f"staged must be a contiguous [{STAGED_FIELDS}, P] block, got {tuple(staged.shape)}")
    outs = dict(input_ids=input_ids, positions=positions, rows=rows, seq_lens=seq_lens,
                prefix_lens=prefix_lens, out_cache_loc=out_cache_loc)
    for name, t in outs.items():
        if t.shape != (num_rows,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [{num_rows}], got {tuple(t.shape)}")
    if staged.dtype != torch.int64 or fed_ids.dtype != torch.int64 or req_to_token.stride(1) != 1:
        raise ValueError("staged and fed_ids must be int64 and req_to_token row-major")
    block = min(1024, triton.next_power_of_2(max(num_rows, 16)))
    _unpack_decode_batch_kernel[(triton.cdiv(num_rows, block),)](
        staged, fed_ids, input_ids, positions, rows, seq_lens, prefix_lens, out_cache_loc,
        req_to_token, num_rows, req_to_token.stride(0), BLOCK=block,
        num_warps=4 if staged.is_cuda else 1, **pdl_options(staged),
    )


def unpack_decode_batch_new(staged: torch.Tensor, fed_ids: torch.Tensor | None,
                            req_to_token: torch.Tensor) -> dict[str, torch.Tensor]:
    """unpack_decode_batch into new tensors (an eager decode): the forward's tensors by name
    (input_ids, positions, rows, seq_lens, prefix_lens, out_cache_loc). On a CUDA device the
    kernel; elsewhere (the CPU runtime) plain indexing, which is also the kernel's reference."""
    if fed_ids is None:
        fed_ids = staged[0]  # read by no row (every source is -1)
    if not staged.is_cuda:
        return unpack_decode_batch_ref(staged, fed_ids, req_to_token)
    num_rows, dev = staged.shape[1], staged.device
    out = dict(input_ids=torch.empty(num_rows, dtype=torch.int64, device=dev),
               positions=torch.empty(num_rows, dtype=torch.int64, device=dev),
               rows=torch.empty(num_rows, dtype=torch.int64, device=dev),
               seq_lens=torch.empty(num_rows, dtype=torch.int32, device=dev),
               prefix_lens=torch.empty(num_rows, dtype=torch.int32, device=dev),
               out_cache_loc=torch.empty(num_rows, dtype=torch.int64, device=dev))
    unpack_decode_batch(staged, fed_ids, **out, req_to_token=req_to_token)
    return out
