"""The only code that combines ReqToToken, TokenPool and RadixCache.

Verbs: `match` (peek, for ordering), `admit` (row + match + lock), `alloc_for` / `alloc_decode`
(slots for a request's next positions, evicting from the tree when short), `cache_unfinished`
(between prefill chunks), `release` (finished or aborted), `retract` (give a running request's KV
back, keep its tokens), `truncate` (forget the KV of replaced trailing tokens: jump-forward),
`free_window_kv` (sliding window), `flush`, `check_integrity`.

Every KV slot is in exactly one of four places, which `check_integrity` verifies:
    free in the pool + evictable in the tree + protected (locked) in the tree
        + owned by running requests ([tree_len, kv_len) of each, minus its window-freed range,
          plus the reserved rest of its last page)
        == pool total

Paged pool (page_size > 1, the GPU default): position p of a request lives at offset p % P of a
page, and a request takes a whole page when it enters one, holding the page's unused rest
(`Req.kv_tail_*`) for its next positions; so each tile of keys decode attention reads is one
run of consecutive slots (one bulk copy) wherever the request lies in the pool. A prefix from
the tree that ends inside a page continues on a fresh page at the same offset (the slots before
it go back to the pool). When no whole page is left, even after evicting, allocation falls back
to single slots: the layout only changes speed, never results.

Sliding-window freeing (issue 7): when every layer is windowed, a key at position j is invisible
to every query at p >= j + W unless j < G (global). A request whose next query is at kv_len frees
its own slots for G <= j <= kv_len - W, in chunks of `window_free_chunk` positions, and points
those req_to_token entries at slot 0 (nothing reads a reused slot; the backends mask them anyway).
Only request-owned positions (>= tree_len) are freed: the tree owns the locked prefix. On release
the freed positions reach the tree as 0 slots (tombstones), and RadixCache reuses a prefix only
up to its first hole, so a later request recomputes what was freed. A request with freed
positions no longer moves its KV into the tree mid-run (cache_unfinished): past the hole the tree
could not serve it anyway. Grammar requests keep JUMP_FORWARD_MARGIN more positions, so that a
jump-forward `truncate` of up to that many tokens still finds the keys its new queries see.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sglite.runtime.mem.radix_cache import RadixCache
from sglite.runtime.scheduler.req import Req

logger = logging.getLogger(__name__)

MAX_WINDOW_FREE_CHUNK = 64  # positions freed at once; at most W // 8, so the slack stays small
JUMP_FORWARD_MARGIN = 16  # extra positions a grammar request keeps (jump-forward may truncate)


class CacheManager:
    def __init__(self, req_to_token, token_pool, *, disable_radix_cache: bool = False,
                 sliding_window: int | None = None, global_tokens: int = 0,
                 window_free_chunk: int | None = None):
        """sliding_window: W to free KV behind (only when EVERY layer is windowed; see
        `freeable_window`), None to keep all KV of running requests."""
        self.req_to_token = req_to_token
        self.token_pool = token_pool
        self.disable_radix_cache = disable_radix_cache
        self.tree = RadixCache(token_pool.free, disable=disable_radix_cache)
        self.holders: set[Req] = set()  # requests that hold a row (and maybe KV)
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.sliding_window = sliding_window
        self.global_tokens = global_tokens
        if window_free_chunk is None and sliding_window is not None:
            window_free_chunk = max(1, min(MAX_WINDOW_FREE_CHUNK, sliding_window // 8))
        self.window_free_chunk = window_free_chunk

    # ---- counters
    @property
    def num_free(self) -> int:
        return self.token_pool.available_size

    @property
    def num_evictable(self) -> int:
        return 0 if self.disable_radix_cache else self.tree.evictable_size

    @property
    def num_protected(self) -> int:
        return 0 if self.disable_radix_cache else self.tree.protected_size

    @property
    def num_held(self) -> int:
        return sum(r.kv_len - r.tree_len - r.num_window_freed + r.kv_tail_len for r in self.holders)

    @property
    def page_size(self) -> int:
        return self.token_pool.page_size

    @property
    def num_total(self) -> int:
        return self.token_pool.total_size

    @property
    def window_held_cap(self) -> int | None:
        """Most slots a request's own KV grows to with window freeing on (None: unbounded)."""
        if self.sliding_window is None:
            return None
        return (self.sliding_window + self.global_tokens + self.window_free_chunk
                + JUMP_FORWARD_MARGIN + 1)

    @property
    def available_size(self) -> int:
        """Slots an allocation can get, evicting from the tree if needed."""
        return self.num_free + self.num_evictable

    # ---- verbs
    def match(self, req: Req) -> int:
        """Length of req's cacheable prefix already in the tree (no lock; may split nodes)."""
        if self.disable_radix_cache:
            return 0
        return self.tree.match_length(req.fill_slice(0, req.max_prefix_len))

    def admit(self, req: Req) -> bool:
        """Take a request row, match the tree and lock the match. False if no row is free."""
        assert req.req_pool_idx is None, "request admitted twice"
        idx = self.req_to_token.alloc()
        if idx is None:
            return False
        req.req_pool_idx = idx
        req.tree_len = req.kv_len = 0
        req.last_node = None
        req.kv_tail_len = 0
        if not self.disable_radix_cache:
            m = self.tree.match_prefix(req.fill_slice(0, req.max_prefix_len))
            self.tree.inc_lock_ref(m.last_node)
            req.last_node = m.last_node
            req.tree_len = req.kv_len = m.length
            if m.length:
                self.req_to_token.write(idx, 0, m.slots)
        self.holders.add(req)
        return True

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """num_tokens fresh slots anywhere, evicting unlocked tree leaves (LRU) when the pool is
        short."""
        short = num_tokens - self.token_pool.available_size
        if short > 0 and not self.disable_radix_cache:
            self.tree.evict(short)
        return self.token_pool.alloc(num_tokens)

    def alloc_for(self, req: Req, num_tokens: int) -> torch.Tensor | None:
        """Slots for req's positions [kv_len, kv_len + num_tokens) (the caller then calls
        `extend`), or None (nothing taken). On a paged pool: the rest of the request's page, then
        whole pages (see the module docstring)."""
        if self.page_size == 1 or num_tokens == 0:
            return self.alloc(num_tokens)
        start, take = self._take_tail(req, num_tokens)
        out = [torch.arange(start, start + take, dtype=torch.int64)]
        rest = num_tokens - take
        if rest:
            pos, size = req.kv_len + len(out[0]), self.page_size
            pages = self._alloc_pages(-(-(pos % size + rest) // size))
            if pages is None:
                slots = self.alloc(rest)
                if slots is None:
                    self._give_back_tail(req, start, take)
                    return None
                out.append(slots)
            else:
                out.append(self._place_on_pages(req, pos, rest, pages))
        return torch.cat(out)

    def alloc_decode(self, reqs: list[Req]) -> torch.Tensor | None:
        """One slot each for reqs' positions kv_len (the caller then calls `advance_decode`), or
        None (nothing taken) if the pool is short."""
        if self.page_size == 1:
            return self.alloc(len(reqs))
        slots = np.zeros(len(reqs), dtype=np.int64)
        has_tail = [r.kv_tail_len > 0 for r in reqs]
        need = [i for i, t in enumerate(has_tail) if not t]
        if len(need) > self.available_size:
            return None
        pages = self._alloc_pages(len(need)) if need else None
        if need and pages is None:
            loose = self.alloc(len(need))
            if loose is None:
                return None
            slots[need] = loose.numpy()
        elif need:
            for j, i in enumerate(need):
                slots[i] = self._place_on_pages(reqs[i], reqs[i].kv_len, 1, pages[j : j + 1])[0]
        for i, req in enumerate(reqs):
            if has_tail[i]:
                slots[i] = self._take_tail(req, 1)[0]
        return torch.from_numpy(slots)

    def extend(self, req: Req, slots: torch.Tensor, *, written: bool = False) -> None:
        """Positions [kv_len, kv_len + len(slots)) of req now live in `slots`. written: the
        caller's batch builder (ModelRunner.make_*_batch) already put them into req_to_token;
        on a GPU each per-request write is a host-to-device copy plus a kernel launch."""
        if not written:
            self.req_to_token.write(req.req_pool_idx, req.kv_len, slots)
        req.kv_len += int(slots.numel())

    def advance_decode(self, reqs: list[Req]) -> None:
        """Each of reqs got one KV slot for its last token, written into req_to_token by
        ModelRunner.make_decode_batch (one copy for the whole batch)."""
        for req in reqs:
            req.kv_len += 1

    def cache_unfinished(self, req: Req) -> None:
        """Move req's own KV into the tree (so peers can share it) and lock it there."""
        if self.disable_radix_cache or req.kv_len == req.tree_len or req.num_window_freed:
            return
        key = req.fill_slice(0, req.kv_len)
        if self.sliding_window is not None and self._tree_has_hole_on(key):
            return  # we keep owning these slots; release() hands them over (or frees them)
        prefix_in_tree, node = self._insert(req, key)  # no holes on this path (checked above)
        self.tree.inc_lock_ref(node)
        self.tree.dec_lock_ref(req.last_node)
        if prefix_in_tree > req.tree_len:  # the tree's slots replace our duplicates there
            tree_slots = self.tree.path_slots(node)[req.tree_len:prefix_in_tree]
            self.req_to_token.write(req.req_pool_idx, req.tree_len, tree_slots)
        req.last_node, req.tree_len = node, req.kv_len

    def release(self, req: Req) -> None:
        """A finished or aborted request gives everything back; its KV stays in the tree
        (evictable), so the next turn of a conversation reuses prompt and answer."""
        if req.req_pool_idx is None:
            return
        self._free_tail(req)
        if req.kv_len > req.seq_len:  # the overlapped decode wrote KV for a token never read
            self.token_pool.free(_live(self._slots(req, req.seq_len, req.kv_len)))
            req.kv_len = req.seq_len
        if self.disable_radix_cache:
            self.token_pool.free(_live(self._slots(req, 0, req.kv_len)))
        else:
            if req.tree_len < req.kv_len:  # else its whole KV is on the locked path already
                self._insert(req, req.fill_slice(0, req.kv_len))
            self.tree.dec_lock_ref(req.last_node)
        self.req_to_token.free(req.req_pool_idx)
        self.holders.discard(req)
        req.req_pool_idx, req.last_node = None, None
        req.tree_len = req.kv_len = 0
        req.window_freed_start = req.window_freed_end = 0

    def truncate(self, req: Req, new_kv_len: int) -> None:
        """Forget the KV of positions [new_kv_len, kv_len): jump-forward replaced those tokens.
        Call it before changing req's tokens past new_kv_len (the tree is matched on fill_ids).

            [tree_len, kv_len)   our own slots: freed
            [new_kv_len, tree_len)  in the tree (old tokens): stays cached, evictable; we move
                                 our lock up to the node at depth new_kv_len
        """
        if new_kv_len >= req.kv_len:
            return
        if req.num_window_freed and new_kv_len - self.sliding_window + 1 < req.window_freed_end:
            raise ValueError(
                f"cannot truncate request {req.rid} to {new_kv_len} tokens: the sliding window "
                f"already freed KV up to position {req.window_freed_end} that those queries see")
        own_from = max(new_kv_len, req.tree_len)
        self._free_tail(req)  # it continued from the old kv_len
        self.token_pool.free(self._slots(req, own_from, req.kv_len))
        if new_kv_len < req.tree_len:
            m = self.tree.match_prefix(req.fill_slice(0, new_kv_len))
            assert m.length == new_kv_len, f"tree lost tokens: matched {m.length} of {new_kv_len}"
            self.tree.inc_lock_ref(m.last_node)
            self.tree.dec_lock_ref(req.last_node)
            req.last_node, req.tree_len = m.last_node, new_kv_len
        req.kv_len = new_kv_len

    def retract(self, req: Req) -> None:
        """Give a running request's KV back (into the tree, unlocked, so eviction can take it);
        its tokens stay, and it resumes later by matching whatever is left in the tree."""
        self.release(req)
        req.num_retractions += 1

    def free_window_kv(self, reqs) -> int:
        """Free the request-owned KV that slid out of the window of every query still to come
        (positions >= kv_len), once at least `window_free_chunk` positions have. Returns slots
        freed. A no-op without a freeable window."""
        if self.sliding_window is None:
            return 0
        num_freed = 0
        for req in reqs:
            if req.req_pool_idx is None:
                continue
            end = req.kv_len - self.sliding_window + 1  # keys j < end: invisible from kv_len on
            if req.grammar is not None:
                end -= JUMP_FORWARD_MARGIN
            start = (req.window_freed_end if req.num_window_freed
                     else max(self.global_tokens, req.tree_len))
            if end - start >= self.window_free_chunk:
                num_freed += self._free_window_range(req, start, end)
        return num_freed

    def flush(self) -> bool:
        """Drop the whole tree. Refused (False) while requests hold KV, as in SGLang."""
        if self.holders:
            return False
        if not self.disable_radix_cache:
            self.tree.evict(self.tree.total_size)
            self.tree.reset()
        return True

    def check_integrity(self) -> None:
        if not self.disable_radix_cache:
            self.tree.check_integrity()
        total = self.num_free + self.num_evictable + self.num_protected + self.num_held
        assert total == self.num_total, (
            f"KV accounting broken: free {self.num_free} + evictable {self.num_evictable} + "
            f"protected {self.num_protected} + held {self.num_held} != total {self.num_total}")
        for r in self.holders:
            assert 0 <= r.tree_len <= r.kv_len <= r.seq_len, f"bad lengths in request {r.rid}"
            self.req_to_token.check_mirror(r.req_pool_idx, r.kv_len)
            if r.num_window_freed:
                assert r.tree_len <= r.window_freed_start < r.window_freed_end <= r.kv_len, (
                    f"window-freed range outside the request's own KV in request {r.rid}")
                freed = self._slots(r, r.window_freed_start, r.window_freed_end)
                assert not bool(freed.any()), f"a freed position still points at a slot ({r.rid})"

    def counters(self) -> dict[str, int]:
        return {"kv_free": self.num_free, "kv_evictable": self.num_evictable,
                "kv_protected": self.num_protected, "kv_held_by_running": self.num_held,
                "kv_total": self.num_total}

    # ---- helpers
    def _insert(self, req: Req, key: list[int]):
        """Put req's KV of `key` into the tree: (how much of key the tree had, its end node)."""
        slots = self._slots(req, 0, len(key))
        prefix_in_tree, node = self.tree.insert_path(key, slots)
        # [tree_len, prefix_in_tree): the tree already had these tokens; our copies are duplicates
        if prefix_in_tree > req.tree_len:  # (0 = already freed by the window: skip)
            dup = slots[req.tree_len:prefix_in_tree]
            self.token_pool.free(dup if self.sliding_window is None else _live(dup))
        return prefix_in_tree, node

    def _alloc_pages(self, k: int) -> np.ndarray | None:
        """k whole pages, evicting from the tree to make them; None: single slots must do."""
        pages = self.token_pool.alloc_pages(k)  # (counting whole pages first scanned them all)
        if pages is None and not self.disable_radix_cache and self.tree.evictable_size:
            self.tree.evict(k * self.page_size)
            pages = self.token_pool.alloc_pages(k)
        return pages

    def _place_on_pages(self, req: Req, pos: int, n: int, pages: np.ndarray) -> torch.Tensor:
        """Positions [pos, pos + n) at their offsets on `pages` (fresh, whole, all allocated):
        the slots before offset pos % P go back to the pool, the rest after the last position
        becomes req's tail."""
        size = self.page_size
        run = (pages[:, None] * size + np.arange(size)).ravel()
        head, end = pos % size, pos % size + n
        if head:
            self.token_pool.free(torch.from_numpy(run[:head]))
        req.kv_tail_start, req.kv_tail_len = int(run[end - 1]) + 1, len(run) - end
        if req.kv_tail_len == 0:
            req.kv_tail_start = 0
        return torch.from_numpy(run[head:end])

    def _take_tail(self, req: Req, n: int) -> tuple[int, int]:
        """Up to n slots from the front of req's tail: (first slot, how many)."""
        start, take = req.kv_tail_start, min(n, req.kv_tail_len)
        req.kv_tail_start += take
        req.kv_tail_len -= take
        return start, take

    def _give_back_tail(self, req: Req, start: int, take: int) -> None:
        """Undo _take_tail(req, ...) that returned (start, take)."""
        if take:
            req.kv_tail_start, req.kv_tail_len = start, req.kv_tail_len + take

    def _free_tail(self, req: Req) -> None:
        if req.kv_tail_len:
            self.token_pool.free(torch.arange(req.kv_tail_start, req.kv_tail_start + req.kv_tail_len))
        req.kv_tail_start = req.kv_tail_len = 0

    def _tree_has_hole_on(self, key: list[int]) -> bool:
        """Does the tree hold `key` past its reusable prefix, on a tombstone? Then insert keeps the
        tree's hole and counts our live slots there as duplicates: a running request must not
        insert (it still reads them). (The match stops at a hole or a mismatch; at a hole the
        next node starts with our next token.)"""
        m = self.tree.match_prefix(key)
        return m.length < len(key) and key[m.length] in m.last_node.children

    def _free_window_range(self, req: Req, start: int, end: int) -> int:
        slots = self._slots(req, start, end)  # all live: request-owned, not freed before
        self.token_pool.free(slots)
        self.req_to_token.write(req.req_pool_idx, start, torch.zeros_like(slots))
        if not req.num_window_freed:
            req.window_freed_start = start
        req.window_freed_end = end
        return end - start

    def _slots(self, req: Req, start: int, end: int) -> torch.Tensor:
        return self.req_to_token.read(req.req_pool_idx, start, end)


def freeable_window(model_config) -> int | None:
    """W if KV behind the window may be freed: only when every layer is windowed, because one
    pool slot holds the KV of all layers of a position and a full-attention layer reads it all."""
    cfg = model_config
    if cfg.sliding_window is None:
        return None
    num_windowed = sum(cfg.window_for_layer(i) is not None for i in range(cfg.num_layers))
    if not cfg.is_all_windowed:
        logger.info("sliding window %d on %d of %d layers: the full-attention layers read every "
                    "position, so no KV is freed as text grows", cfg.sliding_window, num_windowed,
                    cfg.num_layers)
        return None
    logger.info("sliding window %d + %d global tokens on every layer: KV behind the window is "
                "freed while requests run (each holds about W + G slots)", cfg.sliding_window,
                cfg.global_tokens)
    return cfg.sliding_window


def _live(slots: torch.Tensor) -> torch.Tensor:
    """Drop 0 entries (positions whose KV the window already freed)."""
    return slots[slots != 0]
