"""The paged KV pool (page_size > 1, the GPU default): whole pages for the keys decode attention
reads in bulk, single slots as the fallback, and the CacheManager's placement of positions."""

import pytest
import torch

from sglite.runtime.mem.token_pool import PagedTokenPool
from tests.runtime.scheduler.test_cache_manager import decode, make_cache, make_req, prefill


def test_pool_hands_out_whole_pages_and_keeps_them_whole():
    pool = PagedTokenPool(8 * 6 - 1 + 3, 8)  # pages 1..5 whole, page 0 holds slot 0, 3 loose slots after
    assert pool.num_pages == 6 and pool.num_whole_pages() == 5
    pages = pool.alloc_pages(2)
    assert len(pages) == 2 and 0 not in pages.tolist()
    assert pool.available_size == 50 - 16 and pool.num_whole_pages() == 3
    loose = pool.alloc(10)  # 7 of page 0 and the 3 after the last page come first
    assert sorted(loose.tolist()) == list(range(1, 8)) + [48, 49, 50]
    assert pool.num_whole_pages() == 3
    more = pool.alloc(3)  # nothing loose is left: breaks one whole page
    assert pool.num_whole_pages() == 2 and len(set((more // 8).tolist())) == 1
    assert pool.alloc_pages(3) is None and pool.num_whole_pages() == 2  # nothing taken
    pool.check_integrity()
    page_slots = torch.from_numpy((pages[:, None] * 8 + torch.arange(8).numpy()).ravel())
    pool.free(page_slots)
    pool.free(more)
    pool.free(loose)
    assert pool.num_whole_pages() == 5 and pool.available_size == 50
    pool.check_integrity()
    assert pool.alloc(51) is None
    assert 0 not in pool.alloc(50).tolist()
    with pytest.raises(AssertionError):
        pool.free(torch.tensor([0]))


@pytest.mark.parametrize("sizes", [(1, 2, 5), (3, 9, 40), (8, 9)])  # the few-slot path and the vector one
def test_frees_of_any_size_keep_the_counts(sizes):
    """Random frees, a few slots at a time (the plain-Python path) or many: the pool's
    per-page counts, whole-page stack and free count stay right, and bad frees are refused."""
    import random

    rng = random.Random(sum(sizes))
    pool = PagedTokenPool(8 * 20 - 1 + 5, 8)
    held = pool.alloc(pool.available_size).tolist()
    rng.shuffle(held)
    while held:
        n = min(rng.choice(sizes), len(held))
        chunk, held = held[:n], held[n:]
        pool.free(torch.tensor(chunk))
        pool.check_integrity()
        for bad in ([chunk[0]], [0], [chunk[0], chunk[0]], [pool.total_size + 1]):
            with pytest.raises(AssertionError):
                pool.free(torch.tensor(bad))
    assert pool.available_size == pool.total_size and pool.num_whole_pages() == 19


def test_a_pool_smaller_than_a_page_hands_out_single_slots():
    pool = PagedTokenPool(50, 128)
    assert pool.num_whole_pages() == 0 and pool.alloc_pages(1) is None
    slots = pool.alloc(50)
    assert sorted(slots.tolist()) == list(range(1, 51)) and pool.alloc(1) is None
    pool.free(slots)
    pool.check_integrity()


def test_positions_sit_at_their_page_offsets_with_the_rest_of_the_page_reserved():
    cache = make_cache(total=255, page_size=8)
    a = make_req(range(1, 21))  # 20 prompt tokens: pages for 0-7, 8-15, 16-23 (4 reserved)
    prefill(cache, a)
    slots = cache.req_to_token.read(a.req_pool_idx, 0, a.kv_len)
    assert (slots % 8 == torch.arange(20) % 8).all()
    for page in range(3):
        run = slots[page * 8 : page * 8 + 8]
        assert (run - run[0] == torch.arange(len(run))).all()
    assert a.kv_tail_len == 4 and a.kv_tail_start == int(slots[-1]) + 1
    assert cache.num_held == 4  # the prompt moved into the tree (cache_unfinished); the tail is ours
    for t in range(5):  # positions 20-23 from the tail, 24 opens a new page at offset 0
        decode(cache, a, 100 + t)
    slots = cache.req_to_token.read(a.req_pool_idx, 0, a.kv_len)
    assert (slots[20:24] == slots[19] + torch.arange(1, 5)).all() and int(slots[24]) % 8 == 0
    assert a.kv_tail_len == 7
    cache.release(a)
    cache.check_integrity()
    assert cache.num_held == 0 and cache.num_free + cache.num_evictable == cache.num_total


def test_a_cached_prefix_ending_inside_a_page_continues_at_the_same_offset():
    cache = make_cache(total=255, page_size=8)
    a = make_req(range(1, 13))
    prefill(cache, a)
    cache.release(a)
    b = make_req(list(range(1, 11)) + [90, 91, 92])  # shares 10 tokens: the match ends at offset 2
    free_before = cache.num_free
    prefill(cache, b)
    assert b.tree_len == 13
    slots = cache.req_to_token.read(b.req_pool_idx, 0, 13)
    assert int(slots[10]) % 8 == 2 and (slots[10:13] - slots[10] == torch.arange(3)).all()
    assert cache.num_free == free_before - 8 + 2  # one page; its first two slots went back to the pool
    cache.release(b)
    cache.check_integrity()


def test_without_whole_pages_allocation_falls_back_to_single_slots():
    cache = make_cache(total=39, rows=8, page_size=8)  # 4 whole pages + 7 loose slots in page 0
    reqs = [make_req([i] * 3) for i in range(1, 5)]
    for r in reqs:  # a page each
        prefill(cache, r)
    assert cache.token_pool.num_whole_pages() == 0 and cache.num_free == 7  # page 0's slots
    late = make_req([9, 9, 9, 9])
    assert cache.admit(late)
    slots = cache.alloc_for(late, 4)  # loose slots of page 0
    assert slots is not None and late.kv_tail_len == 0 and (slots < 8).all()
    cache.extend(late, slots)
    cache.check_integrity()
    # a decode step: the four continue on their tails; `late` needs a slot, and evicting the
    # released request's prompt from the tree makes its page whole again
    for r in reqs:
        r.output_ids.append(1)
    late.output_ids.append(1)
    cache.release(reqs[0])
    assert cache.token_pool.num_whole_pages() == 0
    run = reqs[1:] + [late]
    step = cache.alloc_decode(run)
    assert step is not None and len(set(step.tolist())) == 4
    assert int(step[-1]) % 8 == 4 and late.kv_tail_len == 3  # position 4 at offset 4 of a page
    assert [r.kv_tail_len for r in reqs[1:]] == [4, 4, 4]
    cache.advance_decode(run)
    cache.check_integrity()


def test_truncate_and_retract_give_the_tail_back():
    cache = make_cache(total=255, page_size=8)
    a = make_req(range(1, 11))
    prefill(cache, a)
    for t in range(3):
        decode(cache, a, 50 + t)
    assert a.kv_tail_len == 3
    cache.truncate(a, 11)
    del a.output_ids[1:]
    assert a.kv_tail_len == 0
    cache.check_integrity()
    a.output_ids.append(77)
    slots = cache.alloc_decode([a])  # position 11 continues on a fresh page at offset 3
    assert int(slots[0]) % 8 == 3 and a.kv_tail_len == 4
    cache.advance_decode([a])
    cache.retract(a)
    assert a.kv_tail_len == 0 and cache.num_held == 0
    cache.check_integrity()


def test_scheduler_on_a_tight_paged_pool_gives_the_same_tokens():
    """The whole loop (chunked prefill, overlapped and plain decode, stop tokens, seeded sampling)
    on a pool of pages of 4 too small for every request's pages: allocation falls back to single
    slots and requests get retracted, and every request still gets the tokens it gets on an
    unpaged pool (fp32, one thread: rows do not depend on the batch's composition)."""
    from sglite.runtime.executor.model_runner import ModelRunner
    from tests.runtime.scheduler.test_overlap_scheduler import _run, _specs

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = {}
        for page_size in (1, 4):
            # 40 slots: the longest request (26 + 13 tokens) fits, four at once do not
            runner = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=40,
                                 max_running_requests=4, page_size=page_size)
            specs = _specs(runner)
            for overlap in (False, True):
                reqs, _ = _run(runner, specs, overlap=overlap)
                outputs[page_size, overlap] = {rid: (r.output_ids, r.finish_reason) for rid, r in reqs.items()}
                if page_size > 1:
                    assert sum(r.num_retractions for r in reqs.values()) > 0  # the pool was tight
        assert outputs[4, False] == outputs[1, False]
        assert outputs[4, True] == outputs[1, True]
    finally:
        torch.set_num_threads(num_threads)
