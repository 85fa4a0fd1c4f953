"""`PrefixTree`: what the router sent to one replica, as a radix tree over prompts (approximate).

The router never sees a replica's KV cache; it remembers the prompts it routed there, as SGLang's
cache-aware router does, and takes the longest match as the replica's cached prefix. Keys are any
sequence: text (str, one element per character) or token ids (a tuple of ints); one tree holds
one kind. The tree is bounded: past `max_size` elements the least recently matched leaves go
first, as the replica's own LRU eviction would drop them. It can be wrong both ways (a replica
evicted a prefix the tree still holds, or the tree forgot one the replica kept); a wrong guess
costs a prefill, never a wrong answer.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Sequence

_clock = itertools.count()  # a logical clock: ties and a coarse timer cannot reorder accesses


class _Node:
    __slots__ = ("edge", "children", "parent", "last_access")

    def __init__(self, edge: Sequence, parent: "_Node | None"):
        self.edge = edge  # the elements from the parent to this node
        self.children: dict = {}  # first element of the child's edge -> child
        self.parent = parent
        self.last_access = next(_clock)


class PrefixTree:
    def __init__(self, max_size: int = 1 << 22):
        self.root = _Node((), None)
        self.max_size = max_size
        self.size = 0  # elements on all edges

    def match(self, key: Sequence) -> int:
        """Length of the longest prefix of `key` in the tree; marks the path as recently used."""
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                break
            n = _common_len(child.edge, key, i)
            child.last_access = next(_clock)
            i += n
            if n < len(child.edge):
                break
            node = child
        return i

    def insert(self, key: Sequence) -> None:
        node, i = self.root, 0
        while i < len(key):
            node.last_access = next(_clock)
            child = node.children.get(key[i])
            if child is None:
                node.children[key[i]] = _Node(key[i:], node)
                self.size += len(key) - i
                break
            n = _common_len(child.edge, key, i)
            if n < len(child.edge):
                child = self._split(child, n)
            node, i = child, i + n
        node.last_access = next(_clock)
        if self.size > self.max_size:  # down to 90%: one walk of the tree pays for many inserts
            self.evict(self.size - self.max_size * 9 // 10)

    def evict(self, num: int) -> None:
        """Drop least recently used leaves until `num` elements are gone (or the tree is empty)."""
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(leaves)
        freed = 0
        while freed < num and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            freed += len(leaf.edge)
            self.size -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))

    def clear(self) -> None:
        self.root, self.size = _Node((), None), 0

    def check_integrity(self) -> None:
        total = 0
        for node in self._nodes():
            if node is not self.root:
                assert node.edge, "a node with an empty edge"
                assert node.parent.children[node.edge[0]] is node, "a child under the wrong key"
                total += len(node.edge)
        assert total == self.size, f"size {self.size}, edges hold {total}"

    # ---- private
    def _split(self, child: _Node, n: int) -> _Node:
        """Cut child's edge after n elements; returns the new middle node."""
        mid = _Node(child.edge[:n], child.parent)
        mid.last_access = child.last_access
        child.parent.children[child.edge[0]] = mid
        child.edge, child.parent = child.edge[n:], mid
        mid.children[child.edge[0]] = child
        return mid

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _common_len(edge: Sequence, key: Sequence, start: int) -> int:
    n = min(len(edge), len(key) - start)
    if edge[:n] == key[start:start + n]:  # the common case (a whole edge matches) at C speed
        return n
    i = 0
    while i < n and edge[i] == key[start + i]:
        i += 1
    return i
