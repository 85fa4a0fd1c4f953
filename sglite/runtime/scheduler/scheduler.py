"""The scheduler loop: admit → extend forward → decode forward → process outputs.

One iteration (`step`) runs at most one extend forward (new prompts, prompt chunks, and running
requests whose jump-forward added tokens) and one decode forward (every running request with
exactly one token without KV). Running extend and decode as separate forwards keeps the decode
batch's shape regular while new requests join the running set every iteration (continuous
batching). When the pool cannot give each decoding request one slot, requests are retracted:
their KV goes back (into the radix tree, unlocked), they keep their tokens and rejoin the front of
the waiting queue.

Overlap (enable_overlap): a decode's tokens are not read at once: they are sampled on the device
(argmax, or the sampler with penalties counting the token in flight) and go to pinned host memory
(`PendingDecode`). The next step launches the following decode with those device tokens as inputs
first (`_decode_ahead`), and appends the pending tokens while the GPU runs it. Every request that
max_new_tokens lets continue is launched ahead; one that a stop token or string ends at the
pending token wasted its row of that decode (its token is dropped, the KV written for its last
token is cached with the rest). Until they are appended a continued request holds KV for one
token the host has not seen (kv_len = seq_len + 1); `CacheManager.release` frees that slot if it
ends then (abort). Anything else (no room, nothing continues) reads the pending tokens first and
takes the plain path. An extend that samples nothing (prefill-only requests, such as a select's
prefix and choices, and prompt chunks) is read likewise a step later (`PendingExtend`): its KV
joins the tree at launch, its input logprobs are packed on the device, and they are recorded
(and its prefill-only requests finish) once the next step has launched its forwards, so that the
host's scheduling and output work run beside the GPU's next forward (pending.py).

Constrained rows stay in that loop: a grammar's mask for decode N+1 needs decode N's token, so
when the batch holds a grammar the pending tokens are appended (and accepted by the matchers)
right after N+1 is launched, the masks of all constrained rows are filled (xgrammar, threaded, on
a worker thread once the matchers have taken the tokens, beside the loop thread's text work)
while the GPU runs it, and sampling is queued behind it with the masks applied on the device.
Plain rows of the batch are sampled in the same op: they wait for no grammar work beyond that
host time, which the forward hides. A request that jumps forward then (output_processor) voids
its row of N+1 (`PendingDecode.stale`); its forced tokens go through the next extend.
"""

from __future__ import annotations

import logging
import time

import torch

from sglite.runtime.scheduler.cache_manager import CacheManager, freeable_window
from sglite.runtime.scheduler.decode_step import DecodeForwards
from sglite.runtime.scheduler.output_processor import OutputProcessor
from sglite.runtime.scheduler.pending import PendingDecode, PendingExtend, samples_nothing
from sglite.runtime.scheduler.req import Req, ReqState
from sglite.runtime.scheduler.policy import (INIT_NEW_TOKEN_RATIO, AddResult, PrefillAdder, decode_reserve,
                                            order_waiting)
from sglite.runtime.scheduler.stats import Stats
from sglite.runtime.scheduler.warmup import warm_up_extend

logger = logging.getLogger(__name__)

# A jump-forward during decoding costs an extend forward that the running batch waits for, about
# half a decode step of a large batch (both read all weights; the decode also reads every row's
# KV): worth it when it gains tokens >= this share of the decode batch (output_processor).
JUMP_MIN_TOKENS_PER_ROW = 0.5


class Scheduler(DecodeForwards):
    """The loop; its decode forwards (plain and overlapped) are DecodeForwards' (decode_step.py)."""

    def __init__(self, runner, *, chunked_prefill_size: int = 512, max_running_requests: int = 128,
                 disable_radix_cache: bool = False, schedule_policy: str = "lpm",
                 grammar_cache=None, enable_jump_forward: bool = True,
                 log_interval: float = 10.0,
                 disable_window_free: bool = False, enable_overlap: bool = True):
        self.runner = runner
        cfg = runner.model_config
        self.cache = CacheManager(
            runner.req_to_token, runner.token_pool, disable_radix_cache=disable_radix_cache,
            sliding_window=None if disable_window_free else freeable_window(cfg),
            global_tokens=cfg.global_tokens)
        self.token_budget = chunked_prefill_size if chunked_prefill_size > 0 else 1 << 62
        warm_up_extend(runner, self.token_budget)  # CUDA: the allocator sized before serving
        self.max_running_requests = min(max_running_requests, runner.req_to_token.max_reqs)
        self.schedule_policy = schedule_policy
        self.grammar_cache = grammar_cache
        self.outputs = OutputProcessor(runner.tokenizer, runner.model_config,
                                       enable_jump_forward=enable_jump_forward,
                                       truncate_kv=self.cache.truncate)
        self.stats = Stats(log_interval=log_interval)
        self.outputs.charge = self.outputs.sampling.charge = self.stats.add_host_time
        self.waiting: list[Req] = []
        self.grammar_queue: list[Req] = []
        self.running: list[Req] = []  # holds a request row (and KV); prefilling or decoding
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.enable_overlap = enable_overlap
        self._pending: PendingDecode | None = None  # a decode whose tokens are not read yet
        self._pending_extend: PendingExtend | None = None  # an extend read after the next launch
        self.jump_min_tokens_per_row = JUMP_MIN_TOKENS_PER_ROW

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.grammar_queue or self._pending_extend)

    # ---- the loop body
    def step(self) -> None:
        t0, forward_time = time.perf_counter(), self.stats.forward_time
        charge = self.stats.add_host_time
        pending_extend = self._pending_extend  # read once this step has launched its forwards
        self._poll_grammars()
        self.outputs.jump_min_tokens = max(1, round(len(self.running) * self.jump_min_tokens_per_row))
        t = charge("poll", t0)
        decoded = self._pending is not None and self._decode_ahead()
        t = charge("decode", t)
        extend = self._schedule_extend()
        t = charge("schedule", t)
        if extend:
            self._run_extend(extend)
            t = charge("extend", t)
        decode = [] if decoded else self._schedule_decode()
        if decode:
            self._run_decode(decode)
            t = charge("decode", t)
        if pending_extend is not None and self._pending_extend is pending_extend:
            self._finish_extend()  # no extend launched behind it this step
            t = charge("extend.finish", t)
        self._drop_finished(queues=False)  # only running requests finish inside a step
        self.cache.free_window_kv(self.running)  # sliding window: KV no future query sees
        charge("release", t)
        step_time = time.perf_counter() - t0
        self.stats.record_step(step_time - (self.stats.forward_time - forward_time), step_time)
        self.stats.maybe_log(self)

    # ---- requests in
    def add_request(self, req: Req) -> None:
        """Queue a validated request (grammar requests wait for their compiled grammar first)."""
        kind_spec = _grammar_spec(req)
        if kind_spec is not None:
            if self.grammar_cache is None:
                raise ValueError("constrained decoding needs a tokenizer (not with dummy weights)")
            req.grammar_future = self.grammar_cache.get_future(*kind_spec)
            req.state = ReqState.GRAMMAR
            self.grammar_queue.append(req)
        else:
            req.state = ReqState.WAITING
            self.waiting.append(req)
        self.stats.num_requests += 1

    def abort(self, predicate) -> int:
        """Abort every queued or running request for which predicate(req) holds."""
        found = [r for q in (self.grammar_queue, self.waiting, self.running) for r in q
                 if predicate(r)]
        for req in found:
            req.finish("abort")
            self.outputs.emit(req)
        self._drop_finished()
        return len(found)

    def fail(self, req: Req, message: str) -> None:
        """Per-request failure: report to its client, free its resources, keep serving others."""
        req.finish("abort", message)
        self.outputs.fail(req, message)
        self._drop_finished()

    # ---- scheduling
    def _poll_grammars(self) -> None:
        for req in [r for r in self.grammar_queue if r.grammar_future.done()]:
            if req not in self.grammar_queue:
                # ended by a reply sent earlier in this loop: a sink's on_error may abort other
                # requests (a ScoreJob aborts its group; client_gone did so before sends deferred it)
                continue
            self.grammar_queue.remove(req)
            try:
                req.grammar = self.outputs.new_grammar_state(req.grammar_future.result())
            except Exception as e:  # a bad regex/schema/grammar: that client only
                req.state = ReqState.FINISHED
                self.outputs.fail(req, str(e))
                continue
            self.outputs.jump_forward(req, min_tokens=1)  # e.g. `{"name": "`: prefilled with the prompt
            if req.is_finished:  # ended by a sink while its forced text was sent
                continue
            req.state = ReqState.WAITING
            self.waiting.append(req)

    def _schedule_extend(self) -> PrefillAdder | None:
        continuing = [r for r in self.running if r.extend_len > 1 and not r.is_finished]
        if not continuing and (not self.waiting or len(self.running) >= self.max_running_requests):
            return None
        decoding = [r for r in self.running if r.extend_len <= 1]
        reserve = sum(decode_reserve(r, self.new_token_ratio, cap=self.cache.window_held_cap)
                      for r in decoding)
        adder = PrefillAdder(
            self.cache, token_budget=self.token_budget,
            kv_budget=self.cache.available_size - reserve,
            num_rows_left=self.max_running_requests - len(self.running) + len(continuing),
            new_token_ratio=self.new_token_ratio)
        for req in continuing:  # already hold a row: chunked prompts, jump-forward extends
            if adder.try_add(req) is AddResult.NO_ROOM:
                break
        for req in order_waiting(self.waiting, self.cache, policy=self.schedule_policy):
            result = adder.try_add(req)
            if result is AddResult.NO_ROOM:
                break
            if result is not AddResult.DEFERRED:
                if req.num_retractions == 0:
                    # prompt tokens only (a jump-forward before admission may match further)
                    req.num_cached_tokens = min(req.tree_len, len(req.input_ids))
                    self.stats.record_admission(len(req.input_ids), req.num_cached_tokens)
                self.waiting.remove(req)
                req.state = ReqState.RUNNING
                self.running.append(req)
        return adder if adder.reqs else None

    def _schedule_decode(self) -> list[Req]:
        reqs = [r for r in self.running if r.extend_len == 1 and not r.is_finished]
        while reqs and self.cache.available_size < len(reqs):
            victim = min(reqs, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            reqs.remove(victim)
            self._retract(victim)
        return reqs

    def _retract(self, req: Req) -> None:
        self.cache.retract(req)
        self.running.remove(req)
        req.state = ReqState.WAITING
        self.waiting.insert(0, req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        self.stats.num_retractions += 1
        logger.info("retracted request %s (%d tokens) to free KV", req.rid, req.seq_len)

    # ---- forwards
    def _run_extend(self, adder: PrefillAdder) -> None:
        """Overlap: an extend that samples nothing is read one step later (PendingExtend), after
        the next forward is launched, so that the host's work on it runs beside that forward;
        its KV is in the tree at once (the cache needs slots, not results). The extend before
        (pending) is read right after this one's launch."""
        charge, t = self.stats.add_host_time, time.perf_counter()  # phases nested in "extend"
        reqs = adder.reqs
        prefix_lens = [r.kv_len for r in reqs]
        new_ids = [r.fill_slice(r.kv_len, r.kv_len + len(s)) for r, s in zip(reqs, adder.slots)]
        logits_from = _logits_from(reqs, prefix_lens, new_ids)
        batch = self.runner.make_extend_batch(  # writes the slots into req_to_token
            [r.req_pool_idx for r in reqs], prefix_lens, new_ids, torch.cat(adder.slots),
            logits_from=logits_from)
        for req, slots in zip(reqs, adder.slots):
            self.cache.extend(req, slots, written=True)
        t = t0 = charge("extend.prepare", t)
        logits = self._forward(reqs, lambda: self.runner.forward(batch))
        self.stats.record_extend(batch.num_tokens, time.perf_counter() - t0)
        t = charge("extend.forward", t)
        if logits is None:
            self._finish_extend()
            return
        packed = None
        if logits_from is not None:
            packed = self.outputs.pack_input_logprobs(reqs, prefix_lens, new_ids, logits, logits_from)
            t = charge("extend.input_logprobs", t)
        for req in reqs:
            if not req.is_finished:
                self.cache.cache_unfinished(req)  # share the prompt (chunk) with later peers
        t = charge("extend.cache", t)
        if self.enable_overlap and samples_nothing(reqs):
            # a prefill-only request that reads nothing of this forward finishes at its launch:
            # its KV is in the tree, so what waits on it (a select's choices) is scheduled while
            # the GPU computes it, instead of after the read (the GPU drained at each select)
            ready = [r for r in reqs if r.extend_len == 0 and not r.return_logprob]
            if ready:
                self._process_outputs(ready, lambda: self.outputs.process(ready, None))
            self._finish_extend(then=PendingExtend(reqs, packed))
            charge("extend.finish", t)
            return
        self._finish_extend()
        t = charge("extend.finish", t)
        if packed is not None:
            self.outputs.record_input_logprobs(packed, packed.device.cpu())
            num_rows = [len(ids) - first for ids, first in zip(new_ids, logits_from)]
            logits = logits[torch.tensor(num_rows).cumsum(0) - 1]  # each request's last row
            t = charge("extend.input_logprobs", t)
        self._sample_and_process(reqs, logits)
        charge("extend.sample", t)

    def _finish_extend(self, *, then: PendingExtend | None = None) -> None:
        """Read and process the pending extend, if any (it ran before any forward launched since:
        this waits for it alone), and leave `then` pending in its place."""
        pending, self._pending_extend = self._pending_extend, then
        if pending is None:
            return

        def process():
            host = pending.read()
            if pending.logprobs is not None:
                self.outputs.record_input_logprobs(pending.logprobs, host)
            done = [r for r, d in zip(pending.reqs, pending.done) if d and not r.is_finished]
            if done:
                self.outputs.process(done, None)  # prefill-only: they finish, nothing sampled

        self._process_outputs(pending.reqs, process)

    def _forward(self, reqs: list[Req], run):
        """run(): a forward of reqs; None if it raised (a broken forward fails its batch, not
        the runtime)."""
        start = self.stats.forward_started(getattr(self.runner, "device", None))
        try:
            out = run()
            self.stats.forward_launched(start)
            return out
        except Exception as e:
            logger.exception("forward failed")
            for req in reqs:
                self.fail(req, f"forward failed: {type(e).__name__}: {e}")
            return None

    def _sample_and_process(self, reqs: list[Req], logits: torch.Tensor) -> None:
        """Sample for the requests whose every token now has KV; others are mid-prompt."""
        rows = [i for i, r in enumerate(reqs) if r.extend_len == 0 and not r.is_finished]
        if not rows:
            return
        ready = [reqs[i] for i in rows]
        self._process_outputs(ready, lambda: self.outputs.process(ready, logits[rows]))

    def _process_outputs(self, reqs: list[Req], process) -> None:
        """Run process(); if it raises, fail the batch's unfinished requests, not the runtime."""
        try:
            process()
        except Exception as e:
            logger.exception("output processing failed")
            for req in reqs:
                if not req.is_finished:
                    self.fail(req, f"{type(e).__name__}: {e}")

    def _drop_finished(self, *, queues: bool = True) -> None:
        """queues: also scan the waiting and grammar queues (aborts and failures end queued
        requests; a step does not, and the waiting queue can be thousands long)."""
        finished = [r for r in self.running if r.is_finished]
        if finished:
            for req in finished:
                self.cache.release(req)
                req.state = ReqState.FINISHED
            self.running = [r for r in self.running if not r.is_finished]
            self.stats.num_finished += len(finished)
        if not queues:
            return
        for q in (self.waiting, self.grammar_queue):
            for req in [r for r in q if r.is_finished]:
                q.remove(req)
                req.state = ReqState.FINISHED


def _grammar_spec(req: Req) -> tuple[str, str] | None:
    p = req.params
    for kind, spec in (("regex", p.regex), ("json_schema", p.json_schema), ("grammar", p.grammar)):
        if spec is not None:
            return kind, spec
    return None


def _logits_from(reqs: list[Req], prefix_lens: list[int], new_ids: list[list[int]]) -> list[int] | None:
    """Per request, the first new-token offset whose logits the extend needs: from the row that
    scores logprob_start_len on for input logprobs, else only the last (it samples). None when no
    request wants input logprobs (the model then takes each request's last row)."""
    if not any(r.wants_input_logprobs for r in reqs):
        return None
    return [min(max(r.logprob_start_len - 1 - p, 0), len(ids) - 1) if r.wants_input_logprobs
            else len(ids) - 1 for r, p, ids in zip(reqs, prefix_lens, new_ids)]
