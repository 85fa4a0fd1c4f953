"""RadixCache: unit tests plus a hypothesis state machine checked against a brute-force prefix model
and a fake slot allocator (the pool identity free + evictable + protected == total)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglite.runtime.mem.radix_cache import NoReuseCache, RadixCache


class FakePool:
    """Free list of int slots 1..size (slot 0 reserved, as in TokenPool)."""

    def __init__(self, size: int):
        self.size = size
        self.free = set(range(1, size + 1))

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > len(self.free):
            return None
        taken = sorted(self.free)[:n]
        self.free.difference_update(taken)
        return torch.tensor(taken, dtype=torch.int64)

    def release(self, slots: torch.Tensor) -> None:
        for s in slots.tolist():
            assert s != 0, "slot 0 freed"
            assert s not in self.free, f"double free of slot {s}"
            self.free.add(s)


def _t(xs):
    return torch.tensor(xs, dtype=torch.int64)


def _tree_prefixes(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """Every token prefix stored in the tree -> its slot (0 = tombstone)."""
    out, stack = {}, [((), cache.root)]
    while stack:
        prefix, node = stack.pop()
        for tok, slot in zip(node.key, node.value.tolist()):
            prefix = prefix + (tok,)
            out[prefix] = slot
        stack.extend((prefix, c) for c in node.children.values())
    return out


def test_split_on_match_and_insert():
    pool = FakePool(100)
    cache = RadixCache(pool.release)
    assert cache.insert([1, 2, 3, 4], _t([11, 12, 13, 14])) == 0
    m = cache.match_prefix([1, 2, 9])
    assert m.length == 2 and m.slots.tolist() == [11, 12]
    assert m.last_node.key == [1, 2] and m.last_node.children[3].key == [3, 4]
    assert cache.insert([1, 2, 5], _t([21, 22, 25])) == 2  # caller frees 21, 22
    assert sorted(cache.root.children[1].children) == [3, 5]
    assert cache.match_prefix([1, 2, 5, 6]).slots.tolist() == [11, 12, 25]
    assert cache.evictable_size == 5 and cache.total_size == 5
    cache.check_integrity()


def test_lru_order_and_parent_becomes_evictable():
    pool = FakePool(100)
    cache = RadixCache(pool.release)
    pool.free -= set(range(1, 8))
    cache.insert([1, 2, 3], _t([1, 2, 3]))
    cache.insert([1, 2, 4], _t([4, 5, 6]))  # duplicates 4, 5 are the caller's to free
    pool.release(_t([4, 5]))
    cache.insert([7], _t([7]))
    cache.match_prefix([1, 2, 3])  # touch [3]: now [4] is the oldest leaf, then [7]
    assert cache.evict(1) == 1 and 6 in pool.free and 3 not in pool.free
    assert cache.evict(1) == 1 and 7 in pool.free
    assert cache.evict(10) == 3  # leaf [3], then its parent [1, 2] once it is a leaf
    assert cache.total_size == 0 and len(pool.free) == 100
    cache.check_integrity()


def test_locked_nodes_never_evicted():
    pool = FakePool(100)
    cache = RadixCache(pool.release)
    pool.free -= set(range(1, 6))
    cache.insert([1, 2, 3], _t([1, 2, 3]))
    cache.insert([5, 6], _t([4, 5]))
    m = cache.match_prefix([1, 2])  # splits [1,2,3]; lock only the [1, 2] part
    cache.inc_lock_ref(m.last_node)
    assert (cache.protected_size, cache.evictable_size) == (2, 3)
    assert cache.evict(100) == 3
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [1, 2]
    cache.check_integrity()
    cache.dec_lock_ref(m.last_node)
    assert (cache.protected_size, cache.evictable_size) == (0, 2)
    with pytest.raises(RuntimeError, match="unbalanced"):
        cache.dec_lock_ref(m.last_node)


def test_split_of_locked_node_keeps_protection():
    cache = RadixCache(lambda s: None)
    cache.insert([1, 2, 3], _t([1, 2, 3]))
    leaf = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(leaf)
    upper = cache.match_prefix([1]).last_node  # cuts the locked node
    assert upper.lock_ref == 1 and cache.protected_size == 3
    cache.check_integrity()
    cache.dec_lock_ref(leaf)
    assert (cache.protected_size, cache.evictable_size) == (0, 3)
    cache.check_integrity()


def test_tombstones_stop_match_at_first_hole():
    pool = FakePool(100)
    cache = RadixCache(pool.release)
    assert cache.insert([1, 2, 3, 4, 5], _t([11, 12, 0, 0, 15])) == 0
    assert cache.total_size == 3  # holes hold no KV
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert m.slots.tolist() == [11, 12] and m.last_node.key == [1, 2]
    assert cache.match_prefix([9]).length == 0
    # inserting over the hole keeps the tree's path: the caller's 23, 24, 25 are duplicates
    assert cache.insert([1, 2, 3, 4, 5, 6], _t([11, 12, 23, 24, 25, 26])) == 5
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).length == 2
    cache.check_integrity()
    pool.free -= {11, 12, 15, 26}
    assert cache.evict(100) == 4 and len(pool.free) == 100  # zeros never reach free_slots


def test_no_reuse_cache():
    pool = FakePool(10)
    cache = RadixCache(pool.release, disable=True)
    assert isinstance(cache, NoReuseCache)
    pool.free -= {1, 2, 3}
    assert cache.insert([1, 2, 3], _t([1, 0, 3])) == 0
    assert pool.free == set(range(1, 11)) - {2}
    m = cache.match_prefix([1, 2, 3])
    assert m.length == 0 and m.last_node is cache.root and cache.total_size == 0
    cache.inc_lock_ref(m.last_node)
    cache.dec_lock_ref(m.last_node)
    cache.check_integrity()


def test_bad_slots_rejected():
    cache = RadixCache(lambda s: None)
    with pytest.raises(ValueError, match="2 tokens but 3 slots"):
        cache.insert([1, 2], _t([1, 2, 3]))
    with pytest.raises(ValueError, match="int64"):
        cache.insert([1], torch.tensor([1], dtype=torch.int32))


POOL_SIZE = 40
keys = st.lists(st.integers(0, 2), min_size=0, max_size=10)


class RadixMachine(RuleBasedStateMachine):
    """Requests run the CacheManager flow (match, lock, allocate the rest, maybe free a window of
    it (tombstones), insert, free duplicates, unlock); other rules lock/unlock/evict at random."""

    def __init__(self):
        super().__init__()
        self.pool = FakePool(POOL_SIZE)
        self.cache = RadixCache(self.pool.release)
        self.model: dict[tuple[int, ...], int] = {}  # prefix -> slot (0: hole); first insert wins
        self.locks: list[tuple[object, tuple[int, ...]]] = []  # (node, the prefix it protects)

    def _model_match(self, key):
        n = 0
        while n < len(key) and self.model.get(tuple(key[: n + 1]), 0) != 0:
            n += 1
        return [self.model[tuple(key[: i + 1])] for i in range(n)]

    @rule(key=keys)
    def match(self, key):
        m = self.cache.match_prefix(key)
        assert m.slots.tolist() == self._model_match(key)
        assert m.length == len(m.slots) == self.cache.match_length(key)

    @rule(key=keys, hole_mask=st.lists(st.booleans(), min_size=10, max_size=10), hold=st.booleans())
    def request(self, key, hole_mask, hold):
        m = self.cache.match_prefix(key)
        self.cache.inc_lock_ref(m.last_node)
        need = len(key) - m.length
        if len(self.pool.free) < need:
            self.cache.evict(need - len(self.pool.free))
            self.model = _tree_prefixes(self.cache)  # which leaves went is checked in `evict`
        new = self.pool.alloc(need)
        if new is None:
            self.cache.dec_lock_ref(m.last_node)
            return
        holes = torch.tensor(hole_mask[:need], dtype=torch.bool)
        self.pool.release(new[holes])  # sliding window freed these while running
        new[holes] = 0
        slots = torch.cat([m.slots, new])
        present, end = self.cache.insert_path(key, slots)
        assert present >= m.length
        spelled, node = [], end  # the node insert_path returns ends the key
        while node is not self.cache.root:
            spelled[:0] = node.key
            node = node.parent
        assert spelled == key
        dup = slots[m.length : present]
        self.pool.release(dup[dup != 0])
        for i in range(present, len(key)):
            self.model[tuple(key[: i + 1])] = int(slots[i])
        if hold:
            self.locks.append((m.last_node, tuple(key[: m.length])))
        else:
            self.cache.dec_lock_ref(m.last_node)

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i):
        node, _ = self.locks.pop(i % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(num=st.integers(0, POOL_SIZE))
    def evict(self, num):
        before = self.model
        freed = self.cache.evict(num)
        after = _tree_prefixes(self.cache)
        removed = {p: s for p, s in before.items() if p not in after}
        assert all(before[p] == s for p, s in after.items()), "evict changed a kept slot"
        assert all(p[:-1] in after or len(p) == 1 for p in after), "tree not prefix-closed"
        assert freed == sum(1 for s in removed.values() if s != 0)
        for _, locked in self.locks:  # a locked prefix is never evicted
            assert all(locked[: i + 1] in after for i in range(len(locked)))
        if freed < num:  # stopped early: every remaining leaf must be locked
            assert all(n.lock_ref > 0 for n in self.cache._leaves)
        self.model = after

    @invariant()
    def integrity(self):
        self.cache.check_integrity()
        assert _tree_prefixes(self.cache) == self.model
        num_free = len(self.pool.free)
        assert num_free + self.cache.evictable_size + self.cache.protected_size == POOL_SIZE


RadixMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixMachine = RadixMachine.TestCase


def test_common_len_matches_a_token_by_token_scan():
    import random

    from sglite.runtime.mem.radix_cache import _common_len

    def scan(a, b, pos):
        n = min(len(a), len(b) - pos)
        return next((i for i in range(n) if a[i] != b[pos + i]), n)

    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 200))]
        pos = rng.randint(0, 20)
        b = ([rng.randint(0, 3) for _ in range(pos)] + a[: rng.randint(0, len(a))]
             + [rng.randint(0, 3) for _ in range(rng.randint(0, 30))])
        assert _common_len(a, b, pos) == scan(a, b, pos)
