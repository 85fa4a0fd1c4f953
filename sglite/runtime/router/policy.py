"""Which replica takes a request: the longest cached prefix, balanced against load.

SGLang's cache-aware router, per replica: a `PrefixTree` of what was sent there and the number of
its outstanding requests (generate, score, graph). For a prompt:
1. the best replica is the one whose tree matches the longest prefix (ties: fewer outstanding);
2. it takes the request when the match covers at least `cache_threshold` of the prompt and its
   load is not out of balance (more than `balance_abs_threshold` outstanding requests above the
   least loaded replica and more than `balance_rel_threshold` times its load);
3. otherwise the least loaded replica takes it (ties: the smallest tree, i.e. the most room
   for a new prefix, then the lowest index), so new prefixes spread over the replicas.
The prompt then goes into the chosen replica's tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from sglite.runtime.router.prefix_tree import PrefixTree


@dataclass(frozen=True)
class RoutingConfig:
    cache_threshold: float = 0.5  # SGLang's default
    # SGLang defaults to 64 / 1.5; 32 starts spreading a burst of one prefix sooner on the
    # smaller batches a CPU or single-GPU replica serves
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 22  # elements (characters or token ids) per tree

    def __post_init__(self):
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("balance thresholds must be >= 0 (absolute) and >= 1 (relative)")


@dataclass(eq=False)  # replicas compare by identity
class ReplicaState:
    """What the policy knows of one replica."""

    index: int
    alive: bool = True
    load: int = 0  # outstanding generate / score / graph requests
    num_routed: int = 0
    num_cache_routed: int = 0  # routed for their prefix match (rule 2)
    text_tree: PrefixTree = field(default_factory=PrefixTree)
    ids_tree: PrefixTree = field(default_factory=PrefixTree)

    def tree(self, key: Sequence) -> PrefixTree:
        return self.text_tree if isinstance(key, str) else self.ids_tree

    @property
    def tree_size(self) -> int:
        return self.text_tree.size + self.ids_tree.size


class CacheAwarePolicy:
    def __init__(self, replicas: list[ReplicaState], config: RoutingConfig | None = None):
        self.replicas, self.config = replicas, config or RoutingConfig()
        for r in replicas:
            r.text_tree.max_size = r.ids_tree.max_size = self.config.max_tree_size

    def choose(self, key: Sequence) -> ReplicaState | None:
        """The replica for a prompt (text or token ids), recorded in its tree; None: none alive."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            return None
        matches = {r.index: r.tree(key).match(key) for r in live}
        best = max(live, key=lambda r: (matches[r.index], -r.load, -r.index))
        least = min(live, key=lambda r: (r.load, r.tree_size, r.index))
        cfg = self.config
        imbalanced = (best.load - least.load > cfg.balance_abs_threshold
                      and best.load > cfg.balance_rel_threshold * least.load)
        by_cache = len(key) > 0 and matches[best.index] >= cfg.cache_threshold * len(key)
        chosen = best if by_cache and not imbalanced else least
        chosen.num_routed += 1
        chosen.num_cache_routed += chosen is best and by_cache and not imbalanced
        chosen.tree(key).insert(key)
        return chosen
