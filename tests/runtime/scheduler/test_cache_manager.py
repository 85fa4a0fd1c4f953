"""CacheManager on CPU (no model): every allocate / cache / evict / retract cycle keeps
free + evictable + protected + held == total, and prefixes are shared through the tree."""

import random

import pytest

from sglite.protocol import SamplingParams
from sglite.runtime.scheduler.cache_manager import CacheManager
from sglite.runtime.mem.req_to_token import ReqToToken
from sglite.runtime.mem.token_pool import PagedTokenPool, TokenPool
from sglite.runtime.scheduler.req import Req


def make_cache(total=64, rows=8, *, disable=False, page_size=1):
    pool = TokenPool(total) if page_size == 1 else PagedTokenPool(total, page_size)
    return CacheManager(ReqToToken(rows, 128), pool, disable_radix_cache=disable)


def make_req(ids, max_new=8):
    return Req(rid="r", input_ids=list(ids), params=SamplingParams(max_new_tokens=max_new), sink=None)


def prefill(cache, req):
    """Admit and give KV to the whole prompt, as one extend forward would."""
    assert cache.admit(req)
    slots = cache.alloc_for(req, req.extend_len)
    assert slots is not None
    cache.extend(req, slots)
    cache.cache_unfinished(req)
    cache.check_integrity()


def decode(cache, req, token):
    req.output_ids.append(token)
    slots = cache.alloc_decode([req])
    assert slots is not None
    cache.extend(req, slots)
    cache.check_integrity()


@pytest.mark.parametrize("disable", [False, True])
def test_finished_request_leaves_prompt_and_answer_in_tree(disable):
    cache = make_cache(disable=disable)
    a = make_req(range(1, 11))
    prefill(cache, a)
    for t in (50, 51, 52):
        decode(cache, a, t)
    a.output_ids.append(53)  # sampled last, never forwarded: no KV
    cache.release(a)
    cache.check_integrity()
    assert cache.num_held == 0 and cache.num_protected == 0
    # turn 2 starts with turn 1's prompt and answer
    b = make_req(list(range(1, 11)) + [50, 51, 52, 53, 7, 8])
    assert cache.admit(b)
    assert b.tree_len == (0 if disable else 13)
    assert cache.num_evictable + cache.num_free + cache.num_protected == cache.num_total
    cache.release(b)
    cache.check_integrity()
    assert cache.flush()
    assert cache.num_free == cache.num_total


def test_shared_prefix_is_stored_once_and_locked_while_running():
    cache = make_cache()
    a, b = make_req([1, 2, 3, 4, 5, 6]), make_req([1, 2, 3, 4, 9, 9])
    prefill(cache, a)
    prefill(cache, b)
    assert b.tree_len == 6 and cache.num_protected == 8  # [1,2,3,4] shared + two tails of 2
    cache.tree.evict(100)  # everything is locked: nothing may go
    assert cache.num_protected == 8
    cache.check_integrity()
    cache.release(a)
    cache.release(b)
    assert cache.num_protected == 0 and cache.num_evictable == 8
    cache.check_integrity()


def test_alloc_evicts_lru_leaves_and_refuses_beyond_capacity():
    cache = make_cache(total=20)
    a = make_req(range(1, 11))
    prefill(cache, a)
    cache.release(a)  # 10 evictable
    assert cache.num_free == 10 and cache.available_size == 20
    slots = cache.alloc(15)  # needs 5 from the tree
    assert slots is not None and cache.num_evictable == 0
    assert cache.alloc(6) is None
    cache.token_pool.free(slots)
    cache.check_integrity()


def test_retract_gives_kv_back_and_resume_reuses_what_is_left():
    cache = make_cache(total=30)
    a = make_req(range(1, 9))
    prefill(cache, a)
    for t in (40, 41, 42):
        decode(cache, a, t)
    a.output_ids.append(43)
    cache.retract(a)
    cache.check_integrity()
    assert a.req_pool_idx is None and a.num_retractions == 1 and cache.num_held == 0
    assert cache.admit(a)  # resumes: prompt + output so far are in the tree, all but the last
    assert a.tree_len == a.seq_len - 1 and a.extend_len == 1
    cache.release(a)
    cache.check_integrity()


def test_flush_refused_while_requests_hold_kv():
    cache = make_cache()
    a = make_req(range(1, 5))
    prefill(cache, a)
    assert not cache.flush()
    cache.release(a)
    assert cache.flush() and cache.num_free == cache.num_total


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("disable", [False, True])
def test_random_cycles_keep_integrity(disable, page_size):
    rng = random.Random(0)
    cache = make_cache(total=120, rows=6, disable=disable, page_size=page_size)
    running: list[Req] = []
    for step in range(400):
        op = rng.random()
        if op < 0.3 and len(running) < 6:
            # prompts from a few shared stems so that the tree branches
            stem = [rng.randint(1, 3)] * rng.randint(0, 12)
            req = make_req(stem + [rng.randint(1, 50) for _ in range(rng.randint(1, 10))])
            if cache.admit(req):
                slots = cache.alloc_for(req, req.extend_len)
                if slots is None:
                    cache.release(req)
                else:
                    cache.extend(req, slots)
                    cache.cache_unfinished(req)
                    running.append(req)
        elif op < 0.7 and running:
            req = rng.choice(running)
            req.output_ids.append(rng.randint(1, 50))
            if req.extend_len == 1:
                slots = cache.alloc_decode([req])
                if slots is None:
                    cache.retract(req)
                    running.remove(req)
                else:
                    cache.extend(req, slots)
        elif op < 0.9 and running:
            req = running.pop(rng.randrange(len(running)))
            cache.release(req)
        elif running:
            req = running.pop(rng.randrange(len(running)))
            cache.retract(req)
        cache.check_integrity()
        cache.token_pool.check_integrity()
    for req in running:
        cache.release(req)
    assert cache.flush()
    assert cache.num_free == cache.num_total


@pytest.mark.parametrize("disable", [False, True])
def test_truncate_frees_replaced_tail_inside_and_outside_the_tree(disable):
    cache = make_cache(disable=disable)
    a = make_req(range(1, 11))
    prefill(cache, a)  # prompt in the tree (tree_len 10)
    for t in (50, 51, 52):
        decode(cache, a, t)  # own KV at [10, 13)
    free_before = cache.num_free
    cache.truncate(a, 12)  # jump-forward replaced token 52
    cache.check_integrity()
    assert a.kv_len == 12 and cache.num_free == free_before + 1
    cache.truncate(a, 8)  # reaches into the tree: the lock moves up, old tokens stay cached
    cache.check_integrity()
    assert a.kv_len == 8 and a.tree_len == (0 if disable else 8)
    del a.output_ids[:]
    a.input_ids[8:] = [90, 91]  # the replacement tokens, then their extend
    slots = cache.alloc(a.extend_len)
    cache.extend(a, slots)
    cache.cache_unfinished(a)
    cache.check_integrity()
    cache.release(a)
    cache.check_integrity()
    assert cache.num_held == 0 and cache.num_protected == 0
    b = make_req(list(range(1, 11)) + [5])  # the old prompt is still cached
    assert cache.admit(b) and b.tree_len == (0 if disable else 10)
    cache.release(b)
    assert cache.flush() and cache.num_free == cache.num_total


def test_requests_sharing_a_new_prefix_wait_for_the_first_to_prefill_it():
    """In-batch sharing (policy.PrefillAdder): a prompt sharing SHARE_MIN_TOKENS new tokens
    with one already in this extend waits a round (then finds them in the tree); others join."""
    from sglite.runtime.scheduler.policy import SHARE_MIN_TOKENS, AddResult, PrefillAdder

    cache = make_cache(total=512, rows=8)
    prefill(cache, make_req(range(1, 11)))  # the tree holds a 10-token prefix
    shared = list(range(1, 11)) + list(range(100, 100 + SHARE_MIN_TOKENS))
    first, twin = make_req(shared + [7]), make_req(shared + [8])
    other = make_req(list(range(1, 11)) + list(range(200, 200 + SHARE_MIN_TOKENS)) + [9])
    adder = PrefillAdder(cache, token_budget=1024, kv_budget=400, num_rows_left=8,
                         new_token_ratio=0.5)
    assert adder.try_add(first) is AddResult.ADDED
    assert adder.try_add(twin) is AddResult.DEFERRED
    assert adder.try_add(other) is AddResult.ADDED


def test_fill_slice_is_a_slice_of_fill_ids():
    """Req.fill_slice (the radix keys, without building fill_ids) equals fill_ids[start:end]
    across the prompt/output boundary."""
    from sglite.protocol import parse_sampling_params

    req = Req(rid="x", input_ids=list(range(10)), params=parse_sampling_params({}), sink=None)
    for output in ([], [100, 101, 102]):
        req.output_ids = list(output)
        for start in range(14):
            for end in range(start, 15):
                assert req.fill_slice(start, end) == req.fill_ids[start:end], (output, start, end)
