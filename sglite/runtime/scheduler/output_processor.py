"""After a forward: grammar masks, sampling, stop checks, detokenization, logprobs, replies.

Text leaves in deltas: each sampled token goes through the request's IncrementalDetokenizer (never
broken UTF-8) and its StopMatcher, which holds back text that may be the start of a stop string
until it is disambiguated; a matched stop string is cut from the text (as SGLang's no_stop_trim
off). A stop token (EOS unless ignore_eos, or stop_token_ids) ends the request without adding
its text. Logprob entries are SGLang's [logprob, token_id, token_text] triples.

Constrained requests: a grammar that completes ends the request (the grammar then allows only stop
tokens; accepting one terminates it, finish_reason "stop" with that token); max_new_tokens and stop
strings cut it as usual (the text then need not match). min_new_tokens does not apply: the grammar
decides where the output ends. Jump-forward (constrained/jump.py): after each accepted token, the
text the grammar forces is appended at once; the tokens it replaces lose their KV
(`truncate_kv`), the new tokens are prefilled by the scheduler's next extend, the stream gets
exactly the forced text, and the detokenizer restarts after it. Requests that want logprobs do not
jump (jumped tokens have no logprobs of their own). A jump costs an extend forward that the whole
running batch waits for (a forward of a few tokens reads all the weights, as a decode step of the
batch does), so during decoding it is taken only when it gains `jump_min_tokens` tokens or more
(the scheduler sets that from the decode batch size; past JUMP_PROBE_MAX_TOKENS it does not even
look); otherwise the forced tokens are decoded one per step, the grammar leaving each a single
allowed token.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sglite.runtime.executor.transfer import tensor_async
from sglite.runtime.scheduler.req import Req
from sglite.runtime.sampling.logprobs import Logprobs, gather_logprobs, pack_rows, unpack_logprobs
from sglite.runtime.scheduler.sampling import Sampling

# A jump that must gain more tokens than this is so rare (JSON's forced keys and punctuation are
# a few to ~15 bytes) that looking for it costs more than it finds: finding the forced text is
# ~25 us per row and step (xgrammar), and 256 JSON rows ran at 10.9k tokens/s with the search vs
# 12.5k without jump-forward (H200, bench/structured.py).
JUMP_PROBE_MAX_TOKENS = 16


class OutputProcessor:
    def __init__(self, tokenizer, model_config, *, enable_jump_forward: bool = True,
                 truncate_kv: Callable[[Req, int], None] = lambda req, kv_len: None):
        self.tokenizer = tokenizer
        self.enable_jump_forward = enable_jump_forward and tokenizer is not None
        self.truncate_kv = truncate_kv  # (req, n): KV past position n is stale (CacheManager)
        self.jump_min_tokens = 1  # see the module docstring
        self.eos_ids = set(model_config.eos_token_ids)
        self.vocab_size = model_config.vocab_size
        self.sampling = Sampling(model_config.vocab_size, eos_token_ids=model_config.eos_token_ids)
        self._token_texts: dict[int, str] = {}  # see _token_text
        # (phase, since) -> now: Stats.add_host_time where a scheduler owns this processor
        self.charge: Callable[[str, float], float] = lambda phase, since: time.perf_counter()

    # ---- per request state
    def init_request(self, req: Req) -> None:
        """Detokenizer and stop matcher (call once, when the request is created)."""
        from sglite.runtime.sampling.detokenizer import StopMatcher

        if self.tokenizer is not None and req.params.max_new_tokens > 0:  # not prefill-only (select)
            req.detok = self._detokenizer(req, req.input_ids)
        req.stop_matcher = StopMatcher(list(req.params.stop), req.params.stop_regex)

    def new_grammar_state(self, compiled):
        from sglite.runtime.sampling.constrained import GrammarState

        return GrammarState(compiled)

    # ---- after a forward
    def process(self, reqs: list[Req], logits: torch.Tensor | None) -> None:
        """reqs: requests whose every token has KV; logits [len(reqs), vocab] of their last one
        (None when none of them samples: prefill-only requests)."""
        rows = []
        for i, req in enumerate(reqs):
            if len(req.output_ids) >= req.params.max_new_tokens:  # 0: prefill only (select)
                req.finish("length")
                self.emit(req)
            else:
                rows.append(i)
        if not rows:
            return
        if len(rows) < len(reqs):
            reqs, logits = [reqs[i] for i in rows], logits[rows]
        next_ids, logprob_logits = self.sampling.sample(reqs, logits)
        logprobs = None
        if logprob_logits is not None:  # the rows of the requests with return_logprob, in order
            wanting = [(r, t) for r, t in zip(reqs, next_ids) if r.return_logprob]
            logprobs = gather_logprobs(logprob_logits, [t for _, t in wanting],
                                       [r.top_logprobs_num for r, _ in wanting])
        self.apply(reqs, next_ids, logprobs)

    def apply(self, reqs: list[Req], next_ids: list[int], logprobs: Logprobs | None = None, *,
              after_accept: Callable[[], Future] | None = None):
        """Append each request's sampled token: stop checks, text, jump-forward, replies.
        logprobs: the gathered values of the requests with return_logprob, in order.
        after_accept: started once the matchers have taken the tokens (the next step's mask fill,
        on a worker thread: xgrammar releases the GIL); the text work runs beside it, and the
        jump-forwards (which move matchers) wait for it."""
        values = iter(zip(*logprobs)) if logprobs is not None else None
        t = time.perf_counter()
        accepted = self._accept_grammar_tokens(reqs, next_ids)
        running = after_accept() if after_accept is not None else None
        t = self.charge("append.accept", t)
        constrained = []  # jump-forward and reply once the fill is done
        for req, token_id in zip(reqs, next_ids):
            value = next(values) if values is not None and req.return_logprob else None
            if req.is_finished:  # aborted by a sink earlier in this loop, or ended by a stop
                continue  # token before this (overlapped) decode was read
            if not req.params.max_new_tokens:  # prefill only: its last prompt token went through
                req.finish("length")  # a decode (one token left after a chunk); nothing sampled
                self.emit(req)
                continue
            if _is_plain(req):
                self._append_plain(req, token_id)
                continue
            if value is not None:
                self._append_lp(req, "output", value[0], token_id, self._top_entries(value[1]))
            self.append_token(req, token_id, accepted=accepted.get(req.uid))
            if req.grammar is None:
                self.emit(req)
            else:
                constrained.append(req)
        t = self.charge("append.text", t)
        if running is not None:
            running.result()
            t = self.charge("append.fill_wait", t)
        for req in constrained:
            self.jump_forward(req)
            self.emit(req)
        self.charge("append.jump_emit", t)


    def _accept_grammar_tokens(self, reqs: list[Req], next_ids: list[int]) -> dict[int, tuple[bool, bool]]:
        """The constrained requests' matchers take their tokens in one batched call: req.uid ->
        (whether its grammar accepted its token, whether the grammar is terminated now)."""
        rows = [(r, t) for r, t in zip(reqs, next_ids) if r.grammar is not None and not r.is_finished]
        if not rows:
            return {}
        from sglite.runtime.sampling.constrained import accept_tokens

        ok = accept_tokens([r.grammar for r, _ in rows], [t for _, t in rows])
        return {r.uid: (a, a and r.grammar.is_terminated()) for (r, _), a in zip(rows, ok)}

    def append_token(self, req: Req, token_id: int, *,
                     accepted: tuple[bool, bool] | None = None) -> None:
        """accepted: req's grammar already took token_id (or refused it), and whether it is
        terminated then (no matcher call here: a mask fill may be reading it); None: take it."""
        req.output_ids.append(token_id)
        if accepted is None and req.grammar is not None:
            ok = req.grammar.accept(token_id)
            accepted = (ok, ok and req.grammar.is_terminated())
        if req.grammar is not None and not accepted[0]:
            req.finish("abort", f"the grammar rejected token {token_id}")
            return
        p = req.params
        min_len = 0 if req.grammar is not None else p.min_new_tokens  # see the module docstring
        if self._ends_on(req, token_id, min_len) or (req.grammar is not None and accepted[1]):
            req.finish("stop", token_id)
        else:
            self.append_text(req, req.detok.append(token_id) if req.detok else "")
        if not req.is_finished and len(req.output_ids) >= p.max_new_tokens:
            req.finish("length")
        if req.is_finished and not isinstance(req.finish_reason["matched"], str):
            if req.detok is not None:  # release what the detokenizer and stop matcher hold
                self.append_text(req, req.detok.flush())
            req.text_buffer += req.stop_matcher.flush()

    def _append_plain(self, req: Req, token_id: int) -> None:
        """append_token + emit for a request without text work (no detokenizer, stop strings,
        grammar or logprobs: dummy weights, token-id clients): a few list and set operations
        instead of the general path's calls, for every request of every decode step."""
        req.output_ids.append(token_id)
        if self._ends_on(req, token_id, req.params.min_new_tokens):
            req.finish("stop", token_id)
        elif len(req.output_ids) >= req.params.max_new_tokens:
            req.finish("length")
        else:
            return
        self.emit(req)

    def _ends_on(self, req: Req, token_id: int, min_len: int) -> bool:
        """Is the just-appended token a stop token (stop_token_ids, or EOS unless ignore_eos)
        past min_len output tokens?"""
        p = req.params
        return ((token_id in p.stop_token_ids or token_id in self.eos_ids and not p.ignore_eos)
                and len(req.output_ids) > min_len)

    def jump_forward(self, req: Req, *, min_tokens: int | None = None) -> None:
        """Append the text req's grammar forces now, if it gains min_tokens tokens (default
        jump_min_tokens; see the module docstring)."""
        min_tokens = self.jump_min_tokens if min_tokens is None else min_tokens
        if not (self.enable_jump_forward and req.grammar is not None and not req.is_finished
                and not req.return_logprob and min_tokens <= JUMP_PROBE_MAX_TOKENS):
            return
        from sglite.runtime.sampling.constrained import jump_forward

        out = req.output_ids
        jf = jump_forward(req.grammar, self.tokenizer, out, min_tokens=min_tokens)
        if jf is None:
            return
        kept = len(out) - jf.num_dropped
        # over max_new_tokens, or KV the sliding window freed: undo, and decode step by step
        fits = kept + len(jf.new_token_ids) <= req.params.max_new_tokens
        if not (fits and self._truncate_kv(req, len(req.input_ids) + kept)):
            req.grammar.rollback(len(jf.new_token_ids))
            assert req.grammar.accept_many(out[kept:]), "re-accepting old tokens failed"
            return
        out[kept:] = jf.new_token_ids
        req.num_jump_forward_tokens += jf.num_jumped
        # the old tokens' text was all emitted (jump_forward only runs at a character boundary),
        # and the new tokens spell it plus jf.text: restart with them as context
        req.detok = self._detokenizer(req, req.fill_ids)
        self.append_text(req, jf.text)

    def append_text(self, req: Req, text: str) -> None:
        emit, matched = req.stop_matcher.feed(text)
        req.text_buffer += emit
        if matched is not None:
            req.finish("stop", matched)

    def emit(self, req: Req) -> None:
        """Send what the client should see now: every delta when streaming, else the end."""
        if not (req.is_finished or req.stream and req.text_buffer):
            return
        text, req.text_buffer = req.text_buffer, ""
        req.sink.on_output(req, text, req.is_finished, self.meta_info(req))

    def fail(self, req: Req, message: str) -> None:
        req.sink.on_error(req, message)

    def meta_info(self, req: Req) -> dict[str, Any]:
        meta = {"prompt_tokens": len(req.input_ids), "completion_tokens": len(req.output_ids),
                "cached_tokens": req.num_cached_tokens}
        if req.num_jump_forward_tokens:
            meta["jump_forward_tokens"] = req.num_jump_forward_tokens
        if req.is_finished:
            meta["finish_reason"] = dict(req.finish_reason)
        if req.return_logprob and (req.is_finished or req.stream):
            # streamed chunks carry the lists so far (SGLang's cumulative meta_info), so a
            # stream's reader can hand each chunk the logprobs of its own tokens
            for key in ("input_token_logprobs", "input_top_logprobs",
                        "output_token_logprobs", "output_top_logprobs"):
                meta[key] = req.logprobs.get(key, [])
        return meta

    # ---- logprobs
    def pack_input_logprobs(self, reqs: list[Req], prefix_lens: list[int], new_ids: list[list[int]],
                            logits: torch.Tensor, logits_from: list[int]) -> LogprobPack | None:
        """logits: [num_rows, vocab], for each request the rows of its new tokens from offset
        logits_from[i] on (see `logits_from`). The row of position p scores input token p + 1;
        token 0 has no logprob (None, recorded now). All requests' rows are packed in one batch
        on the device; `record_input_logprobs` records them once the pack is on the host."""
        rows, wanting, offset = [], [], 0
        for req, prefix_len, ids, first in zip(reqs, prefix_lens, new_ids, logits_from):
            if req.wants_input_logprobs:
                start = req.logprob_start_len
                if prefix_len == 0 and start == 0:
                    self._append_lp(req, "input", None, req.input_ids[0], [])
                for row, pos in enumerate(range(prefix_len + first, prefix_len + len(ids))):
                    if start <= pos + 1 < len(req.input_ids):
                        rows.append(offset + row)
                        wanting.append((req, req.input_ids[pos + 1]))
                if prefix_len + len(ids) >= len(req.input_ids):
                    req.input_logprobs_done = True
            offset += len(ids) - first
        return _pack_logprobs(logits, wanting, rows) if rows else None

    def record_input_logprobs(self, pack: LogprobPack, host: torch.Tensor) -> None:
        """Append the entries of a pack (`host`: its device tensor, now on the CPU)."""
        chosen, tops = unpack_logprobs(host, pack.top_nums)
        if len(pack.keep) < len(chosen):
            chosen, tops = [chosen[i] for i in pack.keep], [tops[i] for i in pack.keep]
        for (req, token_id), logprob, top in zip(pack.wanting, chosen, tops):
            self._append_lp(req, "input", logprob, token_id, self._top_entries(top))

    def _top_entries(self, top: list[tuple[float, int]]) -> list:
        return [[v, i, self._token_text(i)] for v, i in top]

    def _append_lp(self, req: Req, kind: str, logprob, token_id: int, top: list) -> None:
        req.logprobs.setdefault(f"{kind}_token_logprobs", []).append(
            [logprob, token_id, self._token_text(token_id)])
        req.logprobs.setdefault(f"{kind}_top_logprobs", []).append(top)

    def _truncate_kv(self, req: Req, kv_len: int) -> bool:
        try:
            self.truncate_kv(req, kv_len)
        except ValueError:  # CacheManager refuses when the window already freed keys we need
            return False
        return True

    def _detokenizer(self, req: Req, context_ids: list[int]):
        from sglite.runtime.sampling.detokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids=context_ids,
                                      skip_special_tokens=req.params.skip_special_tokens)

    def _token_text(self, token_id: int) -> str:
        """A token's own text, for logprob entries: decoded once per token id (a select of 200
        programs reports 16k entries, each a tokenizer call before)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text


@dataclass
class LogprobPack:
    """Input logprobs of some rows of an extend, packed on the device (sampling/logprobs.py) and
    not read yet: `wanting[j]` = (request, the token it scores) is row `keep[j]` of the pack."""
    wanting: list[tuple[Req, int]]
    keep: Sequence[int]
    top_nums: list[int]  # per pack row: how many top logprobs it keeps
    device: torch.Tensor  # pack_logprobs' [rows, 1 + 2k] fp32


def _pack_logprobs(logits: torch.Tensor, wanting: list[tuple[Req, int]],
                   rows: Sequence[int]) -> LogprobPack:
    """logits [n, vocab] raw; wanting: (request, the token its row scores) for each of `rows`
    (increasing). When most rows are wanted all are packed and the others dropped from the small
    result: `logits[rows]` would copy nearly the whole [n, vocab] block (a select's input
    logprobs: 45 ms a batch on a CPU). No host-device copy here waits for the GPU."""
    device = logits.device
    if 2 * len(rows) < logits.shape[0]:  # few rows: gather those
        logits = logits.index_select(0, tensor_async(rows, torch.int64, device))
        rows = range(len(rows))
    token_ids, top_nums = [0] * logits.shape[0], [0] * logits.shape[0]  # unwanted rows: dropped
    for row, (req, token_id) in zip(rows, wanting):
        token_ids[row], top_nums[row] = token_id, req.top_logprobs_num
    return LogprobPack(wanting, rows, top_nums, pack_rows(logits, token_ids, top_nums))


def _is_plain(req: Req) -> bool:
    return (req.detok is None and req.grammar is None and not req.return_logprob
            and not req.stop_matcher.stops and not req.stop_matcher.regexes and not req.text_buffer)
