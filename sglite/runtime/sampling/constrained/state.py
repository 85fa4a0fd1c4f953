"""Per-request grammar state and the batched token-bitmask helpers the scheduler calls each step.

One decode step for a batch with some constrained rows:

    bitmask = allocate_bitmask(len(reqs), vocab_size)             # int32 [bs, ceil(vocab/32)], CPU
    rows = fill_bitmask(bitmask, [r.grammar for r in reqs])       # None for unconstrained rows
    apply_bitmask(logits, bitmask, rows)                          # in place, CPU or CUDA
    next_ids = sample(logits)
    for r, t in zip(reqs, next_ids): r.grammar and r.grammar.accept(t)

Unconstrained rows are neither filled nor applied, and the whole batch goes through one fill call
(xgrammar's BatchGrammarMatcher, one C++ thread each over a share of the rows) and one apply.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
import xgrammar as xgr

from sglite.runtime.executor.transfer import tensor_async
from sglite.runtime.sampling.constrained.grammar_cache import CompiledGrammar


class GrammarState:
    """A matcher over one compiled grammar: what the request has generated so far.

    After the grammar is complete only the stop tokens are allowed; accepting one terminates the
    state (the request then finishes with that stop token)."""

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self.vocab_size = compiled.vocab_size
        self.matcher = xgr.GrammarMatcher(compiled.xgr_grammar)
        self.num_accepted = 0  # tokens accepted so far: the rollback limit

    def accept(self, token_id: int) -> bool:
        """Advance by one token. False (and no state change) if the grammar forbids it."""
        ok = self.matcher.accept_token(int(token_id))
        self.num_accepted += ok
        return ok

    def accept_many(self, token_ids: Sequence[int]) -> bool:
        """Accept all or nothing: on the first rejected token, roll the accepted ones back."""
        for i, t in enumerate(token_ids):
            if not self.accept(t):
                self.rollback(i)
                return False
        return True

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} tokens")
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    def reset(self) -> None:
        """Back to the start (e.g. a retracted request that will be re-run)."""
        self.matcher.reset()
        self.num_accepted = 0

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def is_completed(self) -> bool:
        """The text so far is a full match (a stop token is allowed next)."""
        return self.matcher.is_completed()

    def jump_forward_text(self) -> str:
        """The longest string every continuation must start with ("" if none): see jump_forward."""
        if self.matcher.is_terminated():
            return ""
        return self.matcher.find_jump_forward_string()

    def fill_allowed(self, bitmask: torch.Tensor, row: int = 0) -> bool:
        """Write this state's allowed tokens into bitmask[row] (int32, CPU). Returns False when
        every token is allowed (nothing to apply)."""
        return self.matcher.fill_next_token_bitmask(bitmask, row)

    def allowed_mask(self) -> torch.Tensor:
        """bool [vocab_size], True = allowed (for samplers that take a boolean mask)."""
        bitmask = allocate_bitmask(1, self.vocab_size)
        self.fill_allowed(bitmask, 0)
        return bitmask_to_bool(bitmask, self.vocab_size)[0]


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """int32 [batch_size, ceil(vocab_size / 32)] on CPU, all bits set (= everything allowed).
    Reuse one across steps: fill_bitmask overwrites the rows it uses."""
    return xgr.allocate_token_bitmask(batch_size, vocab_size)


ROWS_PER_FILL_THREAD = 32  # fewer rows a thread and the hand-off costs more than it saves


def fill_threads() -> int:
    """Threads that share a fill's rows: SGLITE_GRAMMAR_FILL_THREADS, else half the CPUs (at most
    8, at least 1). Each runs xgrammar's batched fill on one C++ thread over its share: xgrammar's
    own threading ("auto", 8 threads) cost 2.5-3 ms a step on the H200 host where one thread fills
    256 JSON rows in 0.74 ms (bench/grammar_fill_threads.py), but one thread alone leaves a rare
    expensive state serial (the benchmark regex's [a-z]{2,8}: 167 of 256 rows at 0.5-1.5 ms each).
    On the 16-CPU H200 host that state's fill took 305 ms on one thread, 92 ms over 4, 38 over 8,
    56 over 12 (2026-12-04); the steady step 0.9 -> 1.0 -> 1.15 ms, beside a ~7 ms forward."""
    value = os.environ.get("SGLITE_GRAMMAR_FILL_THREADS")
    if value:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"SGLITE_GRAMMAR_FILL_THREADS={value!r}: expected a positive number of threads")
        return int(value)
    return max(1, min(8, (os.cpu_count() or 1) // 2))


class _Filler:
    """The thread pool and one single-threaded BatchGrammarMatcher per thread."""

    def __init__(self, threads: int):
        self.matchers = [xgr.BatchGrammarMatcher(max_threads=1) for _ in range(threads)]
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="sglite-grammar-rows") if threads > 1 else None

    def fill(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        k = min(len(self.matchers), max(1, len(rows) // ROWS_PER_FILL_THREAD))
        if k == 1:
            self.matchers[0].batch_fill_next_token_bitmask(matchers, bitmask, rows)
            return
        futures = [self.pool.submit(self.matchers[j].batch_fill_next_token_bitmask,
                                    matchers[j::k], bitmask, rows[j::k]) for j in range(1, k)]
        self.matchers[0].batch_fill_next_token_bitmask(matchers[0::k], bitmask, rows[0::k])
        for f in futures:
            f.result()


_filler: _Filler | None = None


def accept_tokens(states: Sequence[GrammarState], token_ids: Sequence[int]) -> list[bool]:
    """states[i].accept(token_ids[i]) for all i in one call into xgrammar (a decode step's
    constrained rows: 256 rows 4.4 ms instead of 5.8 ms on a 2-core host)."""
    if len(states) == 1:
        return [states[0].accept(token_ids[0])]
    ok = xgr.BatchGrammarMatcher.batch_accept_token([s.matcher for s in states],
                                                    [int(t) for t in token_ids])
    for state, accepted in zip(states, ok):
        state.num_accepted += accepted
    return list(ok)


def fill_bitmask(
    bitmask: torch.Tensor, states: Sequence[GrammarState | None]
) -> list[int]:
    """Fill bitmask[i] for every constrained row i (states[i] not None and not terminated).
    Returns those row indices, the `rows` for apply_bitmask. Rows of other requests are left as
    they are and are never applied."""
    global _filler
    if bitmask.shape[0] < len(states):
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for a batch of {len(states)}")
    rows = [i for i, s in enumerate(states) if s is not None and not s.is_terminated()]
    if len(rows) == 1:
        states[rows[0]].fill_allowed(bitmask, rows[0])
    elif rows:
        if _filler is None:
            _filler = _Filler(fill_threads())
        _filler.fill([states[i].matcher for i in rows], bitmask, rows)
    return rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: Sequence[int] | torch.Tensor) -> None:
    """Set disallowed logits of `rows` to -inf, in place. logits: float [bs, vocab] on CPU or
    CUDA (its width is the model's vocab_size, which the bitmask was sized for); bitmask: the
    int32 tensor fill_bitmask wrote, on the host (copied to the logits' device here) or already
    there; rows: a list (its host-to-device copy never waits for the GPU), or an integer tensor on
    the logits' device."""
    if len(rows) == 0:
        return
    if logits.dim() != 2 or bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not fit bitmask {tuple(bitmask.shape)}: "
            "allocate the bitmask with the model's vocab_size"
        )
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1],
                                        indices=rows if isinstance(rows, list) else list(rows))
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    _apply_on_device(logits, bitmask, rows)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _apply_on_device(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> None:
    """Plain torch ops (unpack the bits, masked_fill) instead of xgrammar's Triton kernel, which
    compiles once per dtype and row-count class at its first use in a server's life (70-1500 ms
    on an H200, a stall of the whole batch) and costs 2-3x the host time per launch
    (bench/grammar_apply.py). All rows: in place; some rows: gathered, masked, scattered back.
    Under inference mode: the logits come from the forward's (inference) tensors."""
    with torch.inference_mode():
        _mask_rows(logits, bitmask, rows)


def _mask_rows(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> None:
    shifts = _SHIFTS.get(logits.device)  # bit k of byte i is token 8 i + k (little-endian words)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(8, dtype=torch.uint8, device=logits.device)
    vocab = logits.shape[1]
    every_row = isinstance(rows, list) and rows == list(range(logits.shape[0]))
    if every_row:
        target, words = logits, bitmask[: logits.shape[0]]
    else:
        rows = (rows.long() if isinstance(rows, torch.Tensor)
                else tensor_async(list(rows), torch.long, logits.device))
        target, words = logits.index_select(0, rows), bitmask.index_select(0, rows)
    banned = ((words.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1)
    banned = banned.view(words.shape[0], -1)[:, :vocab] == 0
    target.masked_fill_(banned, float("-inf"))
    if not every_row:
        logits.index_copy_(0, rows, target)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [bs, words] bitmask → bool [bs, vocab_size] on CPU (bit j of word w is token
    32*w + j). numpy's unpackbits over the little-endian bytes: ~0.1 ms for the 49k vocab, where
    torch shifts or table lookups take milliseconds."""
    as_bytes = bitmask.cpu().contiguous().numpy().view(np.uint8)  # [bs, 4 * words]
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool)
