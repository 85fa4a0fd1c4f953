"""A launched forward's results on their way to the host: the overlap of the scheduler loop.

The GPU runs forward N+1 while the host reads and processes forward N. `PendingDecode` holds a
decode's sampled tokens (on the device: the next decode's inputs; and copying to pinned host
memory); `PendingExtend` holds an extend whose requests sample nothing (prefill-only requests such
as a select's prefix and choices, prompt chunks), with its input logprobs packed on the device
and copying to the host: the scheduler records them after it has launched the next forward.
"""

from __future__ import annotations

import torch

from sglite.runtime.sampling.logprobs import unpack_logprobs
from sglite.runtime.scheduler.req import Req


class PendingDecode:
    """A launched decode's tokens: on the device (the next decode's inputs) and on their way to
    pinned host memory (read once the copy's event has completed), with the logprobs of the
    requests that want them (packed on the device, sampling/logprobs.py, copied with the tokens)."""

    def __init__(self, reqs: list[Req], next_ids: torch.Tensor, host_ids: torch.Tensor, event,
                 host_logprobs: torch.Tensor | None = None):
        self.reqs, self.next_ids, self.host_ids, self.event = reqs, next_ids, host_ids, event
        self.host_logprobs = host_logprobs  # [num wanting, 1 + 2k] fp32
        self.continued = 0  # how many of reqs the next decode continues (set when it launches)
        # per request: its row is void. Set when the tokens before were appended between this
        # decode's launch and its sampling (grammar batches) and made the request jump forward
        # (its row saw the old tokens; the new ones go through an extend or the next decode).
        # Requests that ended then are skipped as finished.
        self.stale: list[bool] | None = None

    def is_stale(self, i: int) -> bool:
        return self.stale is not None and self.stale[i]

    @classmethod
    def start(cls, reqs: list[Req], next_ids: torch.Tensor,
              logprobs: torch.Tensor | None = None) -> PendingDecode:
        """next_ids: a new device tensor (the graph's logits get overwritten by the next replay)."""
        if next_ids.device.type != "cuda":
            return cls(reqs, next_ids, next_ids, None, logprobs)
        host_ids = _to_pinned(next_ids)
        host_lp = None if logprobs is None else _to_pinned(logprobs)
        event = torch.cuda.Event()
        event.record()
        return cls(reqs, next_ids, host_ids, event, host_lp)

    def token_ids(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host_ids.tolist()

    def logprobs(self):
        """After token_ids(): (chosen, tops) of the requests with return_logprob, or None."""
        if self.host_logprobs is None:
            return None
        return unpack_logprobs(self.host_logprobs,
                               [r.top_logprobs_num for r in self.reqs if r.return_logprob])


class PendingExtend:
    """A launched extend that samples nothing: `done[i]` says whether it computes the last
    prompt token of reqs[i] (a prefill-only request then finishes when this is read), and
    `logprobs` (an OutputProcessor LogprobPack, or None) says what its packed input logprobs
    score; the pack is copying to pinned host memory behind the forward."""

    def __init__(self, reqs: list[Req], logprobs=None):
        self.reqs = reqs
        self.done = [r.extend_len == 0 for r in reqs]
        self.logprobs = logprobs
        self.host, self.event = None, None
        if logprobs is not None:
            self.host = logprobs.device
            if logprobs.device.device.type == "cuda":
                self.host = _to_pinned(logprobs.device)
                self.event = torch.cuda.Event()
                self.event.record()

    def read(self) -> torch.Tensor | None:
        """The logprob pack on the host (waits for the forward), or None without logprobs."""
        if self.event is not None:
            self.event.synchronize()
        return self.host


def samples_nothing(reqs: list[Req]) -> bool:
    """After an extend of reqs (their kv_len advanced): does none of them sample from its logits?
    Prefill-only requests (max_new_tokens 0) never do; a request with more than one prompt token
    still without KV continues with another chunk (one token left goes to a decode, which
    samples)."""
    return all(r.params.max_new_tokens == 0 or r.extend_len > 1 for r in reqs)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
