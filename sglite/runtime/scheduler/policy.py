"""Which waiting requests join the next extend forward, and how much of each.

- Order: longest prefix match first ("lpm", the cache-aware policy of the SGLang paper), falling
  back to arrival order past LPM_MAX_QUEUE waiting requests (matching each costs a tree walk) or
  with the radix cache off.
- Admission (`PrefillAdder`): under a token budget per forward (chunked prefill: the last admitted
  request may take only part of its prompt), a KV budget (free + evictable, minus a reserve for the
  decode steps that running requests still have ahead), and the request-row limit.
- In-batch prefix sharing: a request whose prompt shares at least SHARE_MIN_TOKENS new tokens
  (beyond what the tree already holds) with a request prefilling in this very forward waits one
  round; by then that prefix is in the tree, so many requests that share a new system prompt
  prefill it once instead of once each.
"""

from __future__ import annotations

import enum

from sglite.runtime.scheduler.cache_manager import CacheManager
from sglite.runtime.scheduler.req import Req

LPM_MAX_QUEUE = 128
SHARE_MIN_TOKENS = 32
RESERVE_CLIP = 4096  # cap on the decode tokens reserved per running request (as SGLang)
INIT_NEW_TOKEN_RATIO = 0.6  # share of remaining max_new_tokens reserved at admission ...
MIN_NEW_TOKEN_RATIO = 0.15  # ... decaying to this while nothing is retracted
NEW_TOKEN_RATIO_DECAY = 0.002  # per decode step


def order_waiting(waiting: list[Req], cache: CacheManager, *, policy: str) -> list[Req]:
    if policy == "fcfs" or cache.disable_radix_cache or len(waiting) > LPM_MAX_QUEUE:
        return list(waiting)
    matched = {r.uid: cache.match(r) for r in waiting}
    return sorted(waiting, key=lambda r: -matched[r.uid])  # stable: FCFS among equals


def decode_reserve(req: Req, new_token_ratio: float, *, cap: int | None = None) -> int:
    """KV slots to keep aside for the decode steps a request will probably still take. `cap`:
    most slots a request ever holds (sliding-window freeing), so long generations still fit."""
    return int(min(req.remaining_new_tokens, RESERVE_CLIP, cap or RESERVE_CLIP) * new_token_ratio)


class AddResult(enum.Enum):
    ADDED = "added"  # the whole remaining prompt fits in this forward
    CHUNKED = "chunked"  # a part fits; the request continues next round
    DEFERRED = "deferred"  # shares a new prefix with a peer in this batch: wait one round
    NO_ROOM = "no_room"  # token/KV budget or rows exhausted: stop adding


class PrefillAdder:
    """Builds one extend batch: `try_add` each candidate in order until it returns NO_ROOM."""

    def __init__(self, cache: CacheManager, *, token_budget: int, kv_budget: int,
                 num_rows_left: int, new_token_ratio: float, peers: list[Req] = ()):
        self.cache = cache
        self.rem_tokens = token_budget  # new tokens this forward may still take
        self.rem_kv = kv_budget  # slots left after the running requests' decode reserve
        self.rem_rows = num_rows_left
        self.new_token_ratio = new_token_ratio
        self.reqs: list[Req] = []
        self.slots: list = []  # per added request, its fresh KV slots (CPU int64)
        self.peers = list(peers)  # prompts being prefilled now (for in-batch sharing)

    def try_add(self, req: Req) -> AddResult:
        if self.rem_rows <= 0 or self.rem_tokens <= 0:
            return AddResult.NO_ROOM
        if self._shares_new_prefix(req):
            return AddResult.DEFERRED
        admitted_now = req.req_pool_idx is None
        if admitted_now and not self.cache.admit(req):
            return AddResult.NO_ROOM
        extend_len = min(req.extend_len, self.rem_tokens)
        chunked = extend_len < req.extend_len
        need_kv = extend_len + (0 if chunked else decode_reserve(
            req, self.new_token_ratio, cap=self.cache.window_held_cap))
        slots = self.cache.alloc_for(req, extend_len) if need_kv <= self.rem_kv else None
        if slots is None:
            if admitted_now:
                self.cache.release(req)  # nothing computed yet: undo the admission
            return AddResult.NO_ROOM
        self.reqs.append(req)
        self.slots.append(slots)
        self.peers.append(req)
        self.rem_tokens -= extend_len
        self.rem_kv -= need_kv
        self.rem_rows -= 1
        return AddResult.CHUNKED if chunked else AddResult.ADDED

    def _shares_new_prefix(self, req: Req) -> bool:
        if self.cache.disable_radix_cache or not self.peers:
            return False
        ids = req.fill_slice(0, req.max_prefix_len)
        if len(ids) < SHARE_MIN_TOKENS:
            return False
        # shares when a peer's prompt has the same SHARE_MIN_TOKENS tokens right past what the
        # tree holds of ours: one short list comparison per peer (a 200-program select batch made
        # 100k common-prefix scans through numpy, 11.8 s of its 17 s on an H200; whole-head
        # comparisons still copied 1200 tokens per peer). A peer that differs earlier but has
        # this window too is taken for a sharer: that request waits one round, nothing worse.
        start = self.cache.match(req)
        m = start + SHARE_MIN_TOKENS
        if len(ids) < m:
            return False
        window = ids[start:m]
        return any(p.input_ids[start:m] == window for p in self.peers)
