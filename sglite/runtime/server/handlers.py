"""One handler per protocol request: decode, validate, tokenize, hand to the scheduler, reply.

Every failure while handling one message becomes an ErrorOut to its sender (naming the problem);
the runtime keeps serving everyone else.

Long texts are tokenized on a worker thread (`Tokenizing`): the loop keeps stepping the batch
meanwhile (the tokenizer's Rust side runs without the GIL), and the request joins the scheduler
once its ids are there, in arrival order among the tokenized ones. A 120k-character prompt held
every decoding stream for the whole of its tokenization before (bench/tokenize_stall.py).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from sglite import protocol
from sglite.runtime.scheduler.req import Req
from sglite.runtime.server import limits

logger = logging.getLogger("sglite.runtime")


class ClientSink:
    """Outputs of a client's GenerateReq go straight back over the socket."""

    def __init__(self, server, identity: bytes):
        self.server, self.identity = server, identity

    def on_output(self, req: Req, text: str, finished: bool, meta: dict) -> None:
        self.server.send(self.identity, protocol.GenerateOut(
            rid=req.rid, text=text, finished=finished, meta_info=meta,
            output_ids=list(req.output_ids) if finished else None))

    def on_error(self, req: Req, message: str) -> None:
        self.server.send(self.identity, protocol.ErrorOut(rid=req.rid, message=message))


# texts of at least this many characters (all of a message's texts together) are tokenized on the
# worker thread; shorter ones inline: a few ms of tokenizing (about a decode step; the H200 host
# tokenizes ~7 characters a microsecond), and requests keep their order of arrival (a select's
# prefixes and choices come as one batch, as the scheduler's in-batch sharing wants them)
TOKENIZE_OFF_LOOP_CHARS = 32768


@dataclass
class Tokenizing:
    """A request whose texts a worker thread is tokenizing: admit(result) hands it on."""
    identity: bytes
    rid: str
    future: Future
    admit: Callable[[Any], None]
    aborted: bool = False  # an AbortReq came meanwhile: admitted, then aborted (its reply as usual)
    gone: bool = False  # its client went away: dropped


class RequestHandler:
    def __init__(self, server):
        self.server = server
        self.scheduler = server.scheduler
        self.runner = self.scheduler.runner
        self.tokenizer = self.runner.tokenizer
        self.jobs: list = []  # ScoreJobs in progress (they submit internal requests)
        self.tokenizing: collections.deque[Tokenizing] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        if self.tokenizer is not None:
            # transformers sets the Rust tokenizer's truncation and padding on a call whose
            # settings differ from its state (a mutable borrow, refused while the worker thread
            # encodes): one call now leaves them as every later call asks, so none mutates
            self.tokenizer("", add_special_tokens=False)

    def handle(self, identity: bytes, data: bytes) -> None:
        try:
            msg = protocol.decode_request(data)
        except Exception as e:  # DecodeError, ValidationError, RecursionError (deep nesting), ...
            # a malformed payload is dropped with an error to its sender; it must never reach
            # the loop (a RecursionError from a 1 KB message nested 1000 deep used to end it)
            logger.warning("dropped an undecodable message (%d bytes): %s: %s",
                           len(data), type(e).__name__, e)
            self.server.send(identity, protocol.ErrorOut(
                rid=limits.recover_rid(data),
                message=f"undecodable message: {type(e).__name__}: {e}"))
            return
        try:
            getattr(self, f"_on_{type(msg).__name__}")(identity, msg)
        except Exception as e:  # per-request: report and go on
            if not isinstance(e, ValueError):
                logger.exception("handling %s failed", type(msg).__name__)
            self.server.send(identity, protocol.ErrorOut(rid=msg.rid, message=str(e)))

    def after_step(self) -> None:
        self.jobs = [j for j in self.jobs if not j.done]

    def client_gone(self, identity: bytes) -> None:
        n = self.scheduler.abort(lambda r: r.client == identity)
        for job in self.jobs:
            if job.identity == identity:
                job.done = True
        for entry in self.tokenizing:
            if entry.identity == identity:
                entry.gone = True
        if n:
            logger.info("client went away: aborted %d request(s)", n)

    # ---- texts tokenized off the loop
    def _tokenize_then(self, identity: bytes, rid: str, text: str | None, num_chars: int,
                       work: Callable[[], Any], admit: Callable[[Any], None]) -> None:
        """admit(work()), work being the message's tokenizing: at once for fewer than
        TOKENIZE_OFF_LOOP_CHARS characters, else text's size checked here, work() run on the
        tokenizer thread and admit called on the loop thread later (admit_tokenized)."""
        if num_chars < TOKENIZE_OFF_LOOP_CHARS or self.tokenizer is None:
            admit(work())
            return
        self.check_text_size(text)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sglite-tokenize")
        self.tokenizing.append(Tokenizing(identity, rid, self._pool.submit(work), admit))

    def admit_tokenized(self, timeout: float = 0.0) -> None:
        """Hand on the requests whose tokenization is done, oldest first (waiting up to timeout
        seconds for the oldest: the loop has nothing else to do then)."""
        if timeout > 0 and self.tokenizing:
            wait([self.tokenizing[0].future], timeout=timeout)
        while self.tokenizing and self.tokenizing[0].future.done():
            entry = self.tokenizing.popleft()
            if entry.gone:
                continue
            try:
                entry.admit(entry.future.result())
            except Exception as e:  # as handle(): that request only
                if not isinstance(e, ValueError):
                    logger.exception("handling %s failed", entry.rid)
                self.server.send(entry.identity, protocol.ErrorOut(rid=entry.rid, message=str(e)))
                continue
            if entry.aborted:
                self._abort(entry.identity, entry.rid)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests
    def _on_GenerateReq(self, identity: bytes, msg: protocol.GenerateReq) -> None:
        if self._is_active(identity, msg.rid):
            raise ValueError(f"request id {msg.rid!r} is already in use by a running request")
        params = protocol.parse_sampling_params(msg.sampling_params)
        limits.check_grammar_nesting(params.json_schema, params.grammar)  # before compiling

        def admit(ids: list[int]) -> None:
            self.scheduler.add_request(self.make_req(
                msg.rid, ids, params, ClientSink(self.server, identity),
                client=identity, stream=msg.stream, return_logprob=msg.return_logprob,
                logprob_start_len=msg.logprob_start_len, top_logprobs_num=msg.top_logprobs_num))

        self._tokenize_then(identity, msg.rid, msg.text, len(msg.text or ""),
                            lambda: self.prompt_ids(text=msg.text, input_ids=msg.input_ids), admit)

    def _on_ScoreReq(self, identity: bytes, msg: protocol.ScoreReq) -> None:
        from sglite.runtime.scheduler.score import ScoreJob, tokenize_choices

        def admit(tokenized) -> None:
            self.jobs.append(ScoreJob(self, identity, msg, tokenized))

        if not msg.choices:
            raise ValueError("select needs at least one choice")
        self._tokenize_then(identity, msg.rid, msg.text, len(msg.text) + sum(len(c) for c in msg.choices),
                            lambda: tokenize_choices(self, msg.text, msg.choices), admit)

    def _on_AbortReq(self, identity: bytes, msg: protocol.AbortReq) -> None:
        # the aborted request answers for itself (a final GenerateOut with finish_reason abort)
        self._abort(identity, msg.rid)
        for entry in self.tokenizing:  # admitted, then aborted, so that it answers the same way
            if entry.identity == identity and entry.rid == msg.rid:
                entry.aborted = True

    def _abort(self, identity: bytes, rid: str) -> None:
        self.scheduler.abort(lambda r: r.client == identity and r.group == rid)
        for job in self.jobs:
            if job.identity == identity and job.rid == rid:
                job.abort()

    def _on_FlushCacheReq(self, identity: bytes, msg: protocol.FlushCacheReq) -> None:
        if self.scheduler.has_work or not self.scheduler.cache.flush():
            raise ValueError("cannot flush the cache while requests are running")
        self.server.send(identity, protocol.OkOut(rid=msg.rid))

    def _on_InfoReq(self, identity: bytes, msg: protocol.InfoReq) -> None:
        info = self.info()
        if msg.check_integrity:
            info["integrity"] = self.check_integrity()
        self.server.send(identity, protocol.InfoOut(rid=msg.rid, info=info))

    # ---- helpers (also used by the score jobs)
    def prompt_ids(self, *, text: str | None = None, input_ids: list[int] | None = None) -> list[int]:
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if text is not None:
            self.check_text_size(text)
            ids = self.tokenize(text)
        else:
            if len(input_ids) >= self.max_seq_len:
                raise self._too_long(len(input_ids))
            vocab = self.runner.model_config.vocab_size
            bad = [t for t in input_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"input_ids contain {bad[0]}, outside the vocabulary [0, {vocab})")
            ids = list(input_ids)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise self._too_long(len(ids))
        return ids

    def check_text_size(self, text: str) -> None:
        """Sizes first: an 18 MB text is refused here, not after seconds of tokenizing."""
        if self.tokenizer is not None and len(text) >= self.max_seq_len * self.max_token_chars:
            raise self._too_long(len(text) // self.max_token_chars, num_chars=len(text))

    def _too_long(self, num_tokens: int, *, num_chars: int | None = None) -> ValueError:
        """Names the limit that binds: the model's context, or a KV pool smaller than it."""
        # (the runner caps its context at the pool when no context_length was given)
        model_ctx = self.runner.model_config.max_position_embeddings
        pool = self.scheduler.cache.num_total
        count = (f"at least {num_tokens} tokens ({num_chars} characters)" if num_chars
                 else f"{num_tokens} tokens")
        limit = (f"the KV pool holds only {pool} tokens (max_total_tokens; the model's context "
                 f"length is {model_ctx})" if pool <= self.max_seq_len and pool < model_ctx
                 else f"the context length is {self.max_seq_len}")
        return ValueError(f"the prompt has {count}; {limit}, and a request needs its "
                          "prompt plus at least one new token")

    @functools.cached_property
    def max_token_chars(self) -> int:
        return limits.longest_token_chars(self.tokenizer)

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this runtime has no tokenizer (dummy weights): send input_ids")
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))  # a chat template may have added it
        return self.tokenizer(text, add_special_tokens=add_special).input_ids

    def make_req(self, rid: str, ids: list[int], params: protocol.SamplingParams, sink, *,
                 client: bytes | None, group: str | None = None, **kw) -> Req:
        vocab = self.runner.model_config.vocab_size
        if not 0 <= kw.get("top_logprobs_num", 0) <= vocab:
            raise ValueError(f"top_logprobs_num must be in [0, {vocab}] (the vocabulary size), "
                             f"got {kw['top_logprobs_num']}")
        cap = getattr(getattr(self.server, "args", None), "max_top_logprobs", None)
        if cap is not None and kw.get("top_logprobs_num", 0) > cap:
            raise ValueError(f"top_logprobs_num {kw['top_logprobs_num']} is above this runtime's "
                             f"limit of {cap} (raise it with --max-top-logprobs)")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids contain {bad[0]}, outside the vocabulary [0, {vocab})")
        if kw.get("logprob_start_len", -1) >= len(ids):
            raise ValueError(f"logprob_start_len {kw['logprob_start_len']} is past the prompt "
                             f"({len(ids)} tokens)")
        # a request never needs more KV than the pool has or the context allows
        room = self.max_seq_len - len(ids)
        if params.max_new_tokens > room:
            params = msgspec.structs.replace(params, max_new_tokens=room)
        req = Req(rid=rid, input_ids=ids, params=params, sink=sink, client=client,
                  group=rid if group is None else group, **kw)
        self.scheduler.outputs.init_request(req)
        return req

    @property
    def max_seq_len(self) -> int:
        return min(self.runner.max_context_len, self.scheduler.cache.num_total)

    def info(self) -> dict[str, Any]:
        cfg, tok = self.runner.model_config, self.tokenizer
        info = {
            "model_path": self.runner.model_path, "context_length": self.runner.max_context_len,
            "vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_token_ids[0]
            if cfg.eos_token_ids else None, "eos_token_ids": list(cfg.eos_token_ids),
            "chat_template": getattr(tok, "chat_template", None),
            "bos_token": getattr(tok, "bos_token", None),
            "eos_token": getattr(tok, "eos_token", None),
            "max_total_tokens": self.scheduler.cache.num_total,
            "disable_radix_cache": self.scheduler.cache.disable_radix_cache,
            "max_running_requests": self.scheduler.max_running_requests,
            "cuda_graph_max_bs": (max(self.runner.graph_runner.batch_sizes)
                                  if self.runner.graph_runner is not None else None),
            "pid": os.getpid(),
        }
        info.update(self.scheduler.stats.counters(self.scheduler))
        info["host_time_max_s"] = self.scheduler.stats.take_host_time_max()
        return info

    def check_integrity(self) -> str:
        """"ok", or the first broken KV invariant (the idle loop runs the same checks)."""
        try:
            self.scheduler.cache.check_integrity()
            self.scheduler.cache.token_pool.check_integrity()
        except AssertionError as e:
            return f"broken: {e}"
        return "ok"

    def _is_active(self, identity: bytes, rid: str) -> bool:
        s = self.scheduler
        return any(r.client == identity and r.rid == rid
                   for q in (s.waiting, s.running, s.grammar_queue) for r in q) or any(
            e.identity == identity and e.rid == rid and not e.gone for e in self.tokenizing)
