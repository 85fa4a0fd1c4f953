"""Glue between a batch of requests and the sampler: grammar bitmasks for the constrained rows,
the greedy fast path, and the raw logprobs that the output processor reports.

Grammar masks: xgrammar fills the bitmask rows of all constrained requests in one threaded call
into pinned host memory, then one non-blocking copy takes them (and the row indices) to the
device, where a few torch ops apply them to the logits in place. No step waits for the GPU: in the
overlapped decode the host fills while the forward whose logits the masks apply to runs, and
(`start_fill`) on a worker thread while the loop thread appends the previous tokens' text."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import time
from typing import Callable

import msgspec
import torch

from sglite.runtime.scheduler.req import Req


class Sampling:
    def __init__(self, vocab_size: int, *, eos_token_ids=()):
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._bitmasks: list[torch.Tensor] = []  # int32 [rows, words] host buffers, two in turn
        self._turn = 0
        self._worker: ThreadPoolExecutor | None = None  # start_fill's thread
        self._filling: tuple | None = None  # (reqs, bitmask, future of the rows) of start_fill
        # (phase, since) -> now: Stats.add_host_time where a scheduler owns this (phases nested in
        # the scheduler's decode.sample)
        self.charge: Callable[[str, float], float] = lambda phase, since: time.perf_counter()

    def sample(self, reqs: list[Req], logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """logits [bs, vocab] (grammar masks are applied in place). Returns next ids and, when any
        request wants logprobs, the raw logits of those requests' rows [num_wanting, vocab] (a copy
        taken before the masks: SGLang reports logprobs of the raw distribution)."""
        logits = logits.float()
        logprobs = None
        rows = [i for i, r in enumerate(reqs) if r.return_logprob]
        if rows:
            logprobs = logits[rows] if len(rows) < len(reqs) else logits.clone()
        self._apply_grammars(reqs, logits)  # after the copy above: logprobs are of the raw logits
        if all(_is_plain_greedy(r) for r in reqs):
            return logits.argmax(dim=-1).tolist(), logprobs
        from sglite.runtime.sampling.sampler import sample_batch

        ids = sample_batch(logits, [_effective_params(r) for r in reqs], [r.output_ids for r in reqs],
                           eos_token_ids=self.eos_token_ids, prompt_ids=_prompt_ids(reqs))
        return [int(t) for t in ids], logprobs

    def next_ids_on_device(self, reqs: list[Req], logits: torch.Tensor, *,
                           pending_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Each request's next token, left on the device (the overlapped decode): the argmax when
        all are plain greedy, else the sampler; constrained rows masked first (in place; their
        grammar states must have accepted every token before, so pending_ids is None then).
        pending_ids: [k] device tokens that the first k requests generated but whose output_ids
        lack them yet: they sample token len(output_ids) + 1 (seeded streams are keyed by that
        index), and penalties and min_new_tokens count the pending token."""
        ahead = 0 if pending_ids is None else len(pending_ids)
        self._apply_grammars(reqs, logits)
        if all(_is_plain_greedy(r, pending=i < ahead) for i, r in enumerate(reqs)):
            return logits.argmax(dim=-1)
        from sglite.runtime.sampling.sampler import SamplingBatch

        batch = SamplingBatch.from_requests(
            [_effective_params(r) for r in reqs], [r.output_ids for r in reqs], _prompt_ids(reqs),
            eos_ids=self.eos_token_ids,
            device=logits.device, steps=[len(r.output_ids) + (i < ahead) for i, r in enumerate(reqs)],
            pending_ids=pending_ids if ahead else None)
        return batch.sample(logits.float())

    def start_fill(self, reqs: list[Req], device: torch.device) -> Future:
        """Fill the masks of reqs' constrained rows on the worker thread (their matchers must have
        taken every token before, and nothing may move them until the future is done); the
        next_ids_on_device / sample call for the same reqs applies them."""
        from sglite.runtime.sampling.constrained import fill_bitmask

        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="sglite-grammar-fill")
        bitmask = self._host_bitmask(len(reqs), device)
        states = [r.grammar for r in reqs]
        future = self._worker.submit(fill_bitmask, bitmask, states)  # threaded again inside
        self._filling = (reqs, bitmask, future)
        return future

    def _apply_grammars(self, reqs: list[Req], logits: torch.Tensor) -> None:
        """Mask the constrained rows of logits (in place) with their grammars' allowed tokens."""
        filling, self._filling = self._filling, None
        if all(r.grammar is None for r in reqs):
            return
        from sglite.runtime.sampling.constrained import apply_bitmask, fill_bitmask

        t = time.perf_counter()
        if filling is not None and filling[0] is reqs:  # started by start_fill
            bitmask, rows = filling[1], filling[2].result()
        else:
            bitmask = self._host_bitmask(len(reqs), logits.device)
            rows = fill_bitmask(bitmask, [r.grammar for r in reqs])  # threaded, on the host
        t = self.charge("masks.fill", t)
        if not rows:
            return
        if logits.device.type == "cuda":  # pinned: the copy does not wait for the forward in flight
            bitmask = bitmask[: len(reqs)].to(logits.device, non_blocking=True)
        apply_bitmask(logits, bitmask, rows)
        self.charge("masks.apply", t)

    def _host_bitmask(self, rows: int, device: torch.device) -> torch.Tensor:
        """One of two host buffers, in turn: the copy of the one filled last step may still be
        queued behind a forward when this step fills."""
        from sglite.runtime.sampling.constrained import allocate_bitmask

        self._turn ^= 1
        if len(self._bitmasks) < 2 or self._bitmasks[self._turn].shape[0] < rows:
            pin = device.type == "cuda"
            size = max(rows, 8, *(b.shape[0] for b in self._bitmasks))
            self._bitmasks = [allocate_bitmask(size, self.vocab_size) for _ in range(2)]
            if pin:
                self._bitmasks = [b.pin_memory() for b in self._bitmasks]
        return self._bitmasks[self._turn]


def _prompt_ids(reqs: list[Req]):
    """The prompts the sampler needs (some row uses repetition_penalty), else None."""
    if any(r.params.repetition_penalty != 1 for r in reqs):
        return [r.prompt_array for r in reqs]
    return None


def _effective_params(req: Req):
    """A grammar decides where its output ends: masking EOS for min_new_tokens could leave a
    completed grammar no allowed token, so constrained rows ignore min_new_tokens."""
    if req.grammar is not None and req.params.min_new_tokens:
        return msgspec.structs.replace(req.params, min_new_tokens=0)
    return req.params


def _is_plain_greedy(req: Req, *, pending: bool = False) -> bool:
    """Greedy with nothing to mask or penalize: the argmax of the raw logits. pending: one
    generated token is not in output_ids yet (the overlapped decode)."""
    p = req.params
    return ((p.temperature == 0 or p.top_k == 1) and p.frequency_penalty == 0
            and p.presence_penalty == 0 and p.repetition_penalty == 1
            and (len(req.output_ids) + pending >= p.min_new_tokens or req.grammar is not None))
