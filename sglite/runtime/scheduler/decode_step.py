"""The scheduler's decode forwards (a mixin of scheduler.Scheduler, whose state they use): a plain
decode, and the overlap of the loop, where the GPU runs decode N+1 while the host appends the
tokens of decode N (see scheduler.py's docstring for the whole loop, pending.py for the results in
flight).

`_run_decode` launches the running requests' decode; `_launch_decode` is the one launch (a
host-to-device copy and the forward), which under overlap samples on the device and leaves a
`PendingDecode`, appending the previous decode's tokens once its own forward is queued;
`_decode_ahead` launches the next decode of a pending one's continuing requests, fed their tokens
from the device; `_finish_decode` reads a pending decode and appends its tokens.
"""

from __future__ import annotations

import time

import torch

from sglite.runtime.executor.transfer import to_device_async
from sglite.runtime.sampling.logprobs import log_softmax_rows, pack_logprobs
from sglite.runtime.scheduler.pending import PendingDecode
from sglite.runtime.scheduler.policy import MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY
from sglite.runtime.scheduler.req import Req


class DecodeForwards:
    """Scheduler's decode forwards; they use its cache, outputs, stats, running set, pending
    decode and its _forward / _sample_and_process / _process_outputs."""

    def _run_decode(self, reqs: list[Req]) -> None:
        slots = self.cache.alloc_decode(reqs)
        assert slots is not None, "decode scheduled without room (checked in _schedule_decode)"
        self.cache.advance_decode(reqs)
        self._launch_decode(reqs, [r.last_token_id for r in reqs], slots)

    def _launch_decode(self, reqs: list[Req], last_token_ids: list[int], slots: torch.Tensor, *,
                       previous: PendingDecode | None = None, fed_index: list[int] | None = None) -> None:
        """One host-to-device copy for the batch, which also writes the slots into req_to_token.
        previous: the decode before this one, whose tokens are appended once this one is launched
        (and before this one's own are); the first previous.continued of reqs are its continuing
        requests, fed their input ids from previous.next_ids[fed_index] on the device."""
        t0 = time.perf_counter()
        fed = {} if previous is None else dict(fed_ids=previous.next_ids, fed_index=fed_index)
        out = self._forward(reqs, lambda: self.runner.forward_decode(
            [r.req_pool_idx for r in reqs], [r.kv_len for r in reqs], last_token_ids, slots, **fed))
        logits, input_ids = (None, None) if out is None else out
        self.stats.record_decode(len(reqs), time.perf_counter() - t0)
        self.stats.add_host_time("decode.launch", t0)
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO,
                                   self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        if logits is not None and self.enable_overlap:
            # the continued requests' pending tokens are this decode's first inputs
            pending_ids = input_ids[: previous.continued] if previous is not None else None
            rows = _logprob_rows(reqs, logits.device)
            raw = None if rows is None else log_softmax_rows(logits[rows])  # before any mask
            stale = None  # rows voided by a jump-forward (only possible in the branch below)
            if previous is not None and any(r.grammar is not None for r in reqs):
                # a grammar's mask needs every token before: append the pending ones now, while
                # the GPU runs this decode (their stop checks and jump-forwards may end or
                # re-route requests of it: those rows are dropped when it is read)
                device = logits.device
                self._finish_decode(previous, after_accept=lambda: self.outputs.sampling.start_fill(
                    reqs, device))
                previous = pending_ids = None
                stale = [not r.is_finished and r.extend_len > 0 for r in reqs]
            t = time.perf_counter()
            next_ids = self.outputs.sampling.next_ids_on_device(reqs, logits, pending_ids=pending_ids)
            t = self.stats.add_host_time("decode.sample", t)
            pack = None if rows is None else pack_logprobs(
                raw, next_ids[rows], max(r.top_logprobs_num for r in reqs if r.return_logprob))
            self._pending = PendingDecode.start(reqs, next_ids, pack)  # read next step, after
            if stale is not None and any(stale):
                self._pending.stale = stale
            self.stats.add_host_time("decode.pending", t)
            logits = None  # the next forward is queued behind this one
        if previous is not None:
            self._finish_decode(previous)
        if logits is not None:
            self._sample_and_process(reqs, logits)

    # ---- overlap: the GPU runs decode N+1 while the host appends the tokens of decode N
    def _decode_ahead(self) -> bool:
        """Launch the next decode of the pending one's requests, feeding their tokens from the
        device, then read and append the pending tokens. Which requests max_new_tokens lets
        continue is known before their tokens are; a stop token among the pending ones ends its
        request after the launch (its row of the new decode is wasted, see the module docstring).
        False (pending flushed first) when that does not fit this step."""
        pending = self._pending
        cont = [i for i, r in enumerate(pending.reqs) if not pending.is_stale(i)
                and not r.is_finished and len(r.output_ids) + 1 < r.params.max_new_tokens]
        others = [r for r in self.running if r.extend_len == 1 and not r.is_finished]
        reqs = [pending.reqs[i] for i in cont] + others
        if not cont or self.cache.available_size < len(reqs):
            self._finish_pending()
            return False
        slots = self.cache.alloc_decode(reqs)
        self.cache.advance_decode(reqs)  # for cont: the KV of the still unread token
        self._pending = None
        pending.continued = len(cont)
        self._launch_decode(reqs, [0] * len(cont) + [r.last_token_id for r in others], slots,
                            previous=pending,
                            fed_index=None if len(cont) == len(pending.reqs) else cont)
        return True

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._finish_decode(pending)

    def _finish_decode(self, pending: PendingDecode, *, after_accept=None) -> None:
        """after_accept: see OutputProcessor.apply (the next decode's mask fill)."""
        t = time.perf_counter()
        reqs, ids = pending.reqs, pending.token_ids()
        t = self.stats.add_host_time("decode.wait_tokens", t)
        if pending.stale is not None:  # see PendingDecode.stale (never a logprob request)
            kept = [i for i, s in enumerate(pending.stale) if not s]
            reqs, ids = [reqs[i] for i in kept], [ids[i] for i in kept]
        self._process_outputs(reqs, lambda: self.outputs.apply(reqs, ids, pending.logprobs(),
                                                               after_accept=after_accept))
        self.stats.add_host_time("decode.append", t)


def _logprob_rows(reqs: list[Req], device) -> slice | torch.Tensor | None:
    """The rows of a decode batch whose logprobs are wanted: None, all (a slice: no index
    tensor), or a device index copied through pinned memory (a pageable copy would wait for the
    forward in flight)."""
    wanting = [i for i, r in enumerate(reqs) if r.return_logprob]
    if not wanting:
        return None
    if len(wanting) == len(reqs):
        return slice(None)
    return to_device_async(torch.tensor(wanting, dtype=torch.int64), device)
