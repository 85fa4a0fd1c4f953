"""CacheAwarePolicy: a shared prefix stays on one replica, new prefixes spread, load wins when out
of balance, dead replicas take nothing."""

from sglite.runtime.router.policy import CacheAwarePolicy, ReplicaState, RoutingConfig

DOC_A = "You are a careful assistant. Here is a long shared document about apples. " * 3
DOC_B = "Totally different context: a long shared document about the history of ships. " * 3


def _policy(n=2, **cfg):
    return CacheAwarePolicy([ReplicaState(i) for i in range(n)], RoutingConfig(**cfg))


def test_shared_prefix_stays_on_one_replica_and_a_new_prefix_spreads():
    policy = _policy()
    first = policy.choose(DOC_A + "Q1")
    first.load += 1  # outstanding: the router counts it until its last reply
    for q in ("Q2", "Q3", "Q4"):
        r = policy.choose(DOC_A + q)
        assert r is first
        r.load += 1
    other = policy.choose(DOC_B + "Q1")
    assert other is not first  # short match everywhere: the least loaded one
    assert policy.choose(DOC_B + "Q2") is other
    assert first.num_cache_routed == 3 and other.num_cache_routed == 1


def test_idle_tie_goes_to_the_smaller_tree():
    policy = _policy()
    a = policy.choose(DOC_A)
    b = policy.choose(DOC_B)  # both idle: B's prompt goes where there is no tree yet
    assert a is not b


def test_out_of_balance_load_overrides_the_cache():
    policy = _policy(balance_abs_threshold=4, balance_rel_threshold=1.5)
    home = policy.choose(DOC_A + "0")
    placed = []
    for i in range(1, 12):
        r = policy.choose(DOC_A + str(i))
        r.load += 1
        placed.append(r.index)
    # the home replica takes requests until it is 5 above the other (> 4), then the other does
    assert placed[:5] == [home.index] * 5
    assert placed[5] != home.index
    loads = sorted(r.load for r in policy.replicas)
    assert loads[1] - loads[0] <= 5


def test_dead_replicas_take_nothing():
    policy = _policy(3)
    home = policy.choose(DOC_A)
    home.alive = False
    assert policy.choose(DOC_A + "more") is not home
    for r in policy.replicas:
        r.alive = False
    assert policy.choose(DOC_A) is None


def test_token_id_prompts_use_their_own_tree():
    policy = _policy()
    ids = tuple(range(100, 160))
    home = policy.choose(ids)
    home.load += 3
    assert policy.choose(ids + (7, 8)) is home  # matches 60 of 62 ids, load 3 is in balance
    assert home.ids_tree.size == 62 and home.text_tree.size == 0
