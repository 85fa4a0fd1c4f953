"""A request inside the scheduler: token ids, KV bookkeeping and output state.

KV ranges of one request (positions of `fill_ids`), as the CacheManager maintains them:

    [0, tree_len)        KV owned by the radix tree, locked through `last_node` while we run
    [tree_len, kv_len)   KV slots owned by this request (freed or inserted into the tree by us);
                         with a sliding window, [window_freed_start, window_freed_end) inside it
                         is already freed (slot 0 in req_to_token, a tombstone when inserted)
    [kv_len, seq_len)    no KV yet: the next extend (or the decode step for the last token)

With a paged pool the request also holds the rest of its last page (`kv_tail_*`), the slots
its next positions will take.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sglite.protocol import SamplingParams

_next_id = itertools.count()


class ReqState(enum.Enum):
    GRAMMAR = "grammar"  # waiting for its grammar to compile
    WAITING = "waiting"  # in the waiting queue (new, or retracted)
    RUNNING = "running"  # holds KV; being prefilled or decoded
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    rid: str  # the client's id (echoed in replies)
    input_ids: list[int]
    params: SamplingParams
    # where outputs go: sink.on_output(req, delta_text, finished, meta), sink.on_error(req, msg)
    sink: Any
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only
    top_logprobs_num: int = 0
    client: bytes | None = None  # ZMQ identity of the client that (indirectly) asked for it
    group: str = ""  # the client request it serves (its own rid, or a score/graph rid): aborts
    uid: int = field(default_factory=lambda: next(_next_id))
    arrival: float = field(default_factory=time.monotonic)
    state: ReqState = ReqState.WAITING

    # ---- outputs
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None  # {"type": "stop"|"length"|"abort", "matched": ...}
    num_cached_tokens: int = 0  # prompt tokens found in the radix tree at first admission
    num_jump_forward_tokens: int = 0
    logprobs: dict[str, list] = field(default_factory=dict)
    input_logprobs_done: bool = False
    detok: Any = None  # IncrementalDetokenizer
    stop_matcher: Any = None  # StopMatcher
    grammar: Any = None  # GrammarState, once compiled
    grammar_future: Any = None  # concurrent.futures.Future while compiling
    text_buffer: str = ""  # text produced but not yet sent (non-streaming, or held by stops)

    # ---- KV bookkeeping (CacheManager)
    req_pool_idx: int | None = None
    last_node: Any = None  # radix node locked while running
    tree_len: int = 0
    kv_len: int = 0
    prefix_len_at_admit: int = 0
    num_retractions: int = 0
    # sliding-window freeing (CacheManager.free_window_kv): request-owned positions
    # [window_freed_start, window_freed_end) left the window of every query still to come; their
    # slots are back in the pool and their req_to_token entries point at slot 0
    window_freed_start: int = 0
    window_freed_end: int = 0
    # paged pool (CacheManager.alloc_for): slots [kv_tail_start, + kv_tail_len) of the request's
    # last page, allocated and reserved for positions kv_len, kv_len + 1, ...
    kv_tail_start: int = 0
    kv_tail_len: int = 0
    _prompt_array: np.ndarray | None = field(default=None, repr=False)

    @property
    def prompt_array(self) -> np.ndarray:
        """input_ids as int64 numpy, built once: the sampler uploads a repetition-penalized
        request's prompt every step (input_ids never change after the request is made)."""
        if self._prompt_array is None:
            self._prompt_array = np.asarray(self.input_ids, dtype=np.int64)
        return self._prompt_array

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    def fill_slice(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end] without building fill_ids (a 1100-token prompt copied once, not
        twice, each time the scheduler keys the radix tree with it)."""
        n = len(self.input_ids)
        if end <= n or not self.output_ids:
            return self.input_ids[start:end]
        return (self.input_ids[start:] if start < n else []) + self.output_ids[max(start - n, 0): end - n]

    @property
    def last_token_id(self) -> int:
        """fill_ids[-1] without building fill_ids (the decode batch needs it every step)."""
        return self.output_ids[-1] if self.output_ids else self.input_ids[-1]

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def num_window_freed(self) -> int:
        return self.window_freed_end - self.window_freed_start

    @property
    def extend_len(self) -> int:
        """Tokens without KV: the whole remaining prompt while prefilling, 1 while decoding."""
        return len(self.input_ids) + len(self.output_ids) - self.kv_len  # (hot: inlined)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_prefix_len(self) -> int:
        """How much of fill_ids may come from the cache: the last token must be computed (its
        logits sample the next token), and input logprobs need logits from their start on."""
        limit = self.seq_len - 1
        if self.wants_input_logprobs:
            limit = min(limit, max(self.logprob_start_len - 1, 0))
        return limit

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.input_logprobs_done

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.params.max_new_tokens - len(self.output_ids), 0)

    def finish(self, kind: str, matched: str | int | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = {"type": kind, "matched": matched}
