"""Radix tree of cached KV: token-id keys, KV-slot values, lock refs and LRU eviction.

Each node holds a run of token ids (`key`) and the KV slots of those tokens (`value`, int64 CPU
tensor, one slot per token). A root-to-node path spells a token prefix; its concatenated values are
the KV of that prefix. Children are keyed by their first token id. The tree owns the slots it holds:
it returns them to the pool only through `free_slots` when it evicts (or, for NoReuseCache, at once).

Accounting (tokens = live KV slots held by the tree):
- `protected_size`: slots on a path locked by a running request (lock_ref > 0), never evicted;
- `evictable_size`: all other slots in the tree; `evict` frees them, least recently used leaf first;
- the pool identity free + evictable + protected (+ slots held by running requests outside the tree)
  == total is the caller's (CacheManager's) check; `check_integrity()` checks the tree itself.

Lock refs: `inc_lock_ref(node)` increments every node from `node` up to (not including) the root;
a node going 0 -> 1 moves its slots from evictable to protected, 1 -> 0 moves them back. Splitting
a node gives the new upper half the lower half's lock_ref, so handles stay valid across splits.

Tombstones (sliding-window KV freeing, issue 7): a slot value of 0 marks a position whose KV was
freed (slot 0 is the pool's reserved padding slot, never a real allocation). `insert` accepts such
holes; they count as no tokens and are never passed to `free_slots`. The reuse rule is: **a prefix
is reusable only up to its first hole** -- `match_prefix` stops at the first 0 on the path (splitting
the node there), so every slot it returns holds live KV. Consequences, by design: inserting over an
existing path does not fill its holes (the caller's slots there are duplicates it frees, as for any
already-present prefix), and a node at or below a hole is never on a matched path, so it is never
locked and its live slots stay evictable. A window-aware rule (live KV only for [0, G) and the last
W positions) would be a different `_reusable_len`; keep the rule in that one function.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable

import torch

FreeSlots = Callable[[torch.Tensor], None]  # receives int64 CPU slot indices, never 0
_EMPTY = torch.empty(0, dtype=torch.int64)


class TreeNode:
    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "num_live")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None):
        self.key = key  # token ids
        self.value = value  # [len(key)] int64 CPU, KV slots; 0 = tombstone (freed KV)
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.num_live = int(torch.count_nonzero(value))

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __lt__(self, other: TreeNode) -> bool:  # heap tie-break; LRU order comes from the tuple
        return id(self) < id(other)


@dataclass(frozen=True)
class MatchResult:
    slots: torch.Tensor  # [length] int64 CPU, all live (non-zero)
    last_node: TreeNode  # lock this node to protect the matched prefix
    length: int


class RadixCache:
    """Prefix cache keyed by token ids. `RadixCache(free_slots, disable=True)` is a NoReuseCache."""

    def __new__(cls, free_slots: FreeSlots, *, disable: bool = False):
        if disable and cls is RadixCache:
            return super().__new__(NoReuseCache)
        return super().__new__(cls)

    def __init__(self, free_slots: FreeSlots, *, disable: bool = False):
        self.free_slots = free_slots
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget every node WITHOUT freeing slots (the caller resets the pool alongside)."""
        self.root = TreeNode([], _EMPTY, None)
        self.root.lock_ref = 1  # never evicted, never counted
        self.evictable_size = 0
        self.protected_size = 0
        self._leaves: set[TreeNode] = set()  # non-root nodes without children

    @property
    def total_size(self) -> int:
        """Live KV slots held by the tree (tombstones excluded)."""
        return self.evictable_size + self.protected_size

    # ---- queries ------------------------------------------------------------------------------

    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest reusable cached prefix of `key`. Splits the node where the match ends inside it
        and marks the path as recently used. The slots stay valid only while `last_node` is locked
        (or until the next evict)."""
        node, values = self._match_walk(key)
        slots = torch.cat(values) if values else _EMPTY
        return MatchResult(slots=slots, last_node=node, length=len(slots))

    def path_slots(self, node: TreeNode) -> torch.Tensor:
        """The slots of the path from the root to `node` (holes included), without a key walk."""
        values = []
        while node is not self.root:
            values.append(node.value)
            node = node.parent
        return torch.cat(values[::-1]) if values else _EMPTY

    def match_length(self, key: list[int]) -> int:
        """match_prefix(key).length, without gathering the slots (ordering, sharing checks)."""
        return sum(len(v) for v in self._match_walk(key)[1])

    def _match_walk(self, key: list[int]) -> tuple[TreeNode, list[torch.Tensor]]:
        """match_prefix's walk: the node where the match ends, and the matched nodes' values."""
        now = next(self._clock)
        node, pos, values = self.root, 0, []
        while pos < len(key) and (child := node.children.get(key[pos])) is not None:
            child.last_access = now
            n = _reusable_len(child, key, pos)
            if n < len(child.key):
                if n > 0:
                    node = self._split(child, n)
                    values.append(node.value)
                break
            values.append(child.value)
            node, pos = child, pos + n
        return node, values

    # ---- updates ------------------------------------------------------------------------------

    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        """Add `key` with its KV `slots` (0 = freed position). Returns the length of the prefix of
        `key` that was already in the tree: the tree keeps its own slots there, so the caller frees
        its non-zero slots in [its cached length, returned length). The tree takes the rest."""
        return self.insert_path(key, slots)[0]

    def insert_path(self, key: list[int], slots: torch.Tensor) -> tuple[int, TreeNode]:
        """insert, and the node where `key` ends (lock it to protect the key; the path spells
        key, with the tree's slots, holes included: match_prefix stops at the first hole)."""
        _check_slots(key, slots)
        now = next(self._clock)
        node, pos = self.root, 0
        while pos < len(key) and (child := node.children.get(key[pos])) is not None:
            child.last_access = now
            n = _common_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            node, pos = child, pos + n
        if pos < len(key):
            return pos, self._add_leaf(node, key[pos:], slots[pos:].clone(), now)
        return pos, node

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= node.num_live
                self.protected_size += node.num_live
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_lock_ref on an unlocked node (unbalanced lock/unlock)")
            if node.lock_ref == 1:
                self.evictable_size += node.num_live
                self.protected_size -= node.num_live
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` live slots if possible, least recently used unlocked leaf
        first (a parent left as an unlocked leaf joins the candidates). Returns slots freed."""
        heap = [(n.last_access, n) for n in self._leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, leaf = heapq.heappop(heap)
            num_freed += leaf.num_live
            parent = self._remove_leaf(leaf)
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent))
        return num_freed

    # ---- checks -------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Recompute counters, leaves and lock refs by walking the tree; raise AssertionError on a
        mismatch or on a slot that appears twice."""
        evictable = protected = 0
        seen: set[int] = set()
        leaves: set[TreeNode] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            assert len(node.key) == len(node.value), "key/value length mismatch"
            live = [s for s in node.value.tolist() if s != 0]
            assert node.num_live == len(live), "stale num_live"
            assert seen.isdisjoint(live), "a KV slot appears twice in the tree"
            seen.update(live)
            if node is not self.root:
                assert node.key, "empty non-root node"
                assert node.lock_ref >= 0
                if node.lock_ref > 0:
                    protected += node.num_live
                else:
                    evictable += node.num_live
                if node.is_leaf:
                    leaves.add(node)
            child_locks = 0
            for first, child in node.children.items():
                assert child.parent is node and child.key[0] == first, "broken child link"
                child_locks += child.lock_ref
                stack.append(child)
            if node is not self.root:
                assert node.lock_ref >= child_locks, "lock_ref below its children's locks"
        assert (evictable, protected) == (self.evictable_size, self.protected_size), (
            f"counters (evictable={self.evictable_size}, protected={self.protected_size}) != "
            f"tree walk (evictable={evictable}, protected={protected})"
        )
        assert leaves == self._leaves, "leaf set out of date"

    # ---- private ------------------------------------------------------------------------------

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after n tokens; returns the new upper node (which inherits lock_ref)."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        upper.children = {child.key[n]: child}
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        child.num_live -= upper.num_live
        return upper

    def _add_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor, now: int) -> TreeNode:
        leaf = TreeNode(key, value, parent)
        leaf.last_access = now
        parent.children[key[0]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self.evictable_size += leaf.num_live  # a new leaf is never locked
        return leaf

    def _remove_leaf(self, leaf: TreeNode) -> TreeNode:
        live = leaf.value[leaf.value != 0]
        if len(live):
            self.free_slots(live)
        self.evictable_size -= leaf.num_live
        parent = leaf.parent
        del parent.children[leaf.key[0]]
        self._leaves.discard(leaf)
        if parent is not self.root and parent.is_leaf:
            self._leaves.add(parent)
        return parent


class NoReuseCache(RadixCache):
    """`--disable-radix-cache`: nothing is shared across requests. match_prefix finds nothing and
    insert frees the given slots at once (returning 0). Only insert a FINISHED request's KV."""

    def match_prefix(self, key: list[int]) -> MatchResult:
        return MatchResult(slots=_EMPTY, last_node=self.root, length=0)

    def match_length(self, key: list[int]) -> int:
        return 0

    def insert_path(self, key: list[int], slots: torch.Tensor) -> tuple[int, TreeNode]:
        _check_slots(key, slots)
        live = slots[slots != 0]
        if len(live):
            self.free_slots(live)
        return 0, self.root


def _common_len(node_key: list[int], key: list[int], pos: int) -> int:
    """Length of the common prefix of node_key and key[pos:]. Slice comparisons run in C: the
    whole overlap first (the usual case: a shared prompt), then a bisection down to a short tail
    (a per-token Python loop over 1200-token keys was 1.5 s of a 100-program select's host time)."""
    n = min(len(node_key), len(key) - pos)
    if (node_key if n == len(node_key) else node_key[:n]) == key[pos: pos + n]:  # one copy, not two
        return n
    lo, hi = 0, n  # node_key[:lo] matches; the first mismatch is in [lo, hi)
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if node_key[lo:mid] == key[pos + lo: pos + mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if node_key[i] != key[pos + i]:
            return i
    return hi


def _reusable_len(node: TreeNode, key: list[int], pos: int) -> int:
    """How much of `node` a match may take: the common prefix, cut at the node's first hole."""
    n = _common_len(node.key, key, pos)
    if node.num_live < len(node.key):
        holes = (node.value[:n] == 0).nonzero()
        if len(holes):
            n = int(holes[0])
    return n


def _check_slots(key: list[int], slots: torch.Tensor) -> None:
    if slots.dtype != torch.int64 or slots.device.type != "cpu" or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D int64 CPU tensor, got {slots.dtype} {slots.shape} "
                         f"on {slots.device}")
    if len(slots) != len(key):
        raise ValueError(f"insert: {len(key)} tokens but {len(slots)} slots")
