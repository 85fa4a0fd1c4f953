"""PrefixTree against a brute-force model of what was inserted, on text and on token ids."""

import random

import pytest

from sglite.runtime.router.prefix_tree import PrefixTree


def _brute_match(keys, key) -> int:
    best = 0
    for k in keys:
        n = 0
        while n < min(len(k), len(key)) and k[n] == key[n]:
            n += 1
        best = max(best, n)
    return best


@pytest.mark.parametrize("kind", ["text", "ids"])
def test_match_is_the_longest_common_prefix_with_any_inserted_key(kind):
    rng = random.Random(0)
    make = (lambda n: "".join(rng.choice("abc") for _ in range(n))) if kind == "text" \
        else (lambda n: tuple(rng.randrange(3) for _ in range(n)))
    tree, keys = PrefixTree(), []
    for _ in range(300):
        key = make(rng.randrange(0, 12))
        if rng.random() < 0.5:
            tree.insert(key)
            keys.append(key)
        assert tree.match(key) == _brute_match(keys, key), (key, keys)
    tree.check_integrity()
    # every element is stored once: the size is that of the union of all prefixes
    assert tree.size == len({k[:i] for k in keys for i in range(1, len(k) + 1)})


def test_split_keeps_both_branches():
    head = "system: you are helpful. question "
    tree = PrefixTree()
    tree.insert(head + "one")
    tree.insert(head + "two")
    assert tree.match(head + "three") == len(head + "t")
    assert tree.match(head + "one") == len(head + "one")
    assert tree.match("other") == 0
    tree.check_integrity()


def test_eviction_drops_the_least_recently_matched_leaves_first():
    tree = PrefixTree(max_size=30)
    tree.insert("a" * 10)
    tree.insert("b" * 10)
    tree.match("a" * 10)  # 'a...' is now newer than 'b...'
    tree.insert("c" * 15)  # 35 > 30: evicts down to 27, i.e. the 'b' branch
    tree.check_integrity()
    assert tree.match("b" * 10) == 0
    assert tree.match("a" * 10) == 10 and tree.match("c" * 15) == 15
    assert tree.size == 25


def test_eviction_removes_emptied_inner_nodes():
    tree = PrefixTree()
    tree.insert("shared-x")
    tree.insert("shared-y")
    tree.evict(tree.size)
    assert tree.size == 0 and not tree.root.children
    tree.check_integrity()
