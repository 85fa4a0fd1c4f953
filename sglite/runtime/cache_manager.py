"""The only code that combines ReqToToken, TokenPool and RadixCache.

Verbs: `match` (peek, for ordering), `admit` (row + match + lock), `alloc` (slots, evicting from
the tree when short), `cache_unfinished` (between prefill chunks), `release` (finished or aborted),
`retract` (give a running request's KV back, keep its tokens), `truncate` (forget the KV of
replaced trailing tokens: jump-forward), `flush`, `check_integrity`.

Every KV slot is in exactly one of four places, which `check_integrity` verifies:
    free in the pool + evictable in the tree + protected (locked) in the tree
        + owned by running requests ([tree_len, kv_len) of each) == pool total
"""

from __future__ import annotations

import torch

from sglite.runtime.mem.radix_cache import RadixCache
from sglite.runtime.req import Req


class CacheManager:
    def __init__(self, req_to_token, token_pool, *, disable_radix_cache: bool = False):
        self.req_to_token = req_to_token
        self.token_pool = token_pool
        self.disable_radix_cache = disable_radix_cache
        self.tree = RadixCache(token_pool.free, disable=disable_radix_cache)
        self.holders: set[Req] = set()  # requests that hold a row (and maybe KV)

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
        return sum(r.kv_len - r.tree_len for r in self.holders)

    @property
    def num_total(self) -> int:
        return self.token_pool.total_size

    @property
    def available_size(self) -> int:
        """Slots an allocation can get, evicting from the tree if needed."""
        return self.num_free + self.num_evictable

    # ---- verbs
    def match(self, req: Req) -> int:
        """Length of req's cacheable prefix already in the tree (no lock; may split nodes)."""
        if self.disable_radix_cache:
            return 0
        return self.tree.match_prefix(req.fill_ids[: req.max_prefix_len]).length

    def admit(self, req: Req) -> bool:
        """Take a request row, match the tree and lock the match. False if no row is free."""
        assert req.req_pool_idx is None, "request admitted twice"
        idx = self.req_to_token.alloc()
        if idx is None:
            return False
        req.req_pool_idx = idx
        req.tree_len = req.kv_len = 0
        req.last_node = None
        if not self.disable_radix_cache:
            m = self.tree.match_prefix(req.fill_ids[: req.max_prefix_len])
            self.tree.inc_lock_ref(m.last_node)
            req.last_node = m.last_node
            req.tree_len = req.kv_len = m.length
            if m.length:
                self.req_to_token.write(idx, 0, m.slots)
        self.holders.add(req)
        return True

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """num_tokens fresh slots, evicting unlocked tree leaves (LRU) when the pool is short."""
        short = num_tokens - self.token_pool.available_size
        if short > 0 and not self.disable_radix_cache:
            self.tree.evict(short)
        return self.token_pool.alloc(num_tokens)

    def extend(self, req: Req, slots: torch.Tensor) -> None:
        """Positions [kv_len, kv_len + len(slots)) of req now live in `slots`."""
        self.req_to_token.write(req.req_pool_idx, req.kv_len, slots)
        req.kv_len += int(slots.numel())

    def cache_unfinished(self, req: Req) -> None:
        """Move req's own KV into the tree (so peers can share it) and lock it there."""
        if self.disable_radix_cache or req.kv_len == req.tree_len:
            return
        key = req.fill_ids[: req.kv_len]
        self._insert(req, key)
        m = self.tree.match_prefix(key)
        assert m.length == req.kv_len, f"tree lost tokens: matched {m.length} of {req.kv_len}"
        self.tree.inc_lock_ref(m.last_node)
        self.tree.dec_lock_ref(req.last_node)
        # the tree's slots replace our duplicates in [tree_len, prefix_in_tree)
        self.req_to_token.write(req.req_pool_idx, 0, m.slots)
        req.last_node, req.tree_len = m.last_node, req.kv_len

    def release(self, req: Req) -> None:
        """A finished or aborted request gives everything back; its KV stays in the tree
        (evictable), so the next turn of a conversation reuses prompt and answer."""
        if req.req_pool_idx is None:
            return
        if self.disable_radix_cache:
            self.token_pool.free(self._slots(req, 0, req.kv_len))
        else:
            self._insert(req, req.fill_ids[: req.kv_len])
            self.tree.dec_lock_ref(req.last_node)
        self.req_to_token.free(req.req_pool_idx)
        self.holders.discard(req)
        req.req_pool_idx, req.last_node = None, None
        req.tree_len = req.kv_len = 0

    def truncate(self, req: Req, new_kv_len: int) -> None:
        """Forget the KV of positions [new_kv_len, kv_len): jump-forward replaced those tokens.
        Call it before changing req's tokens past new_kv_len (the tree is matched on fill_ids).

            [tree_len, kv_len)   our own slots: freed
            [new_kv_len, tree_len)  in the tree (old tokens): stays cached, evictable; we move
                                 our lock up to the node at depth new_kv_len
        """
        if new_kv_len >= req.kv_len:
            return
        own_from = max(new_kv_len, req.tree_len)
        self.token_pool.free(self._slots(req, own_from, req.kv_len))
        if new_kv_len < req.tree_len:
            m = self.tree.match_prefix(req.fill_ids[:new_kv_len])
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

    def counters(self) -> dict[str, int]:
        return {"kv_free": self.num_free, "kv_evictable": self.num_evictable,
                "kv_protected": self.num_protected, "kv_held_by_running": self.num_held,
                "kv_total": self.num_total}

    # ---- helpers
    def _insert(self, req: Req, key: list[int]) -> None:
        slots = self._slots(req, 0, len(key))
        prefix_in_tree = self.tree.insert(key, slots)
        # [tree_len, prefix_in_tree): the tree already had these tokens; our copies are duplicates
        if prefix_in_tree > req.tree_len:
            self.token_pool.free(slots[req.tree_len:prefix_in_tree])

    def _slots(self, req: Req, start: int, end: int) -> torch.Tensor:
        return self.req_to_token.read(req.req_pool_idx, start, end)
