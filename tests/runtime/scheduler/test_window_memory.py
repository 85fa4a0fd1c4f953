"""Sliding-window KV freeing (issue 7): a windowed tiny model generating far past its window holds
about W + G slots, decodes the same greedy tokens as with freeing off, keeps the pool identity
after every step, and the radix tree reuses what it caches only up to the first freed position."""

from __future__ import annotations

import logging

import pytest
import torch

from sglite.protocol import SamplingParams
from sglite.runtime.scheduler.cache_manager import CacheManager, freeable_window
from sglite.runtime.mem.req_to_token import ReqToToken
from sglite.runtime.mem.token_pool import TokenPool
from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.scheduler.req import Req
from sglite.runtime.scheduler.scheduler import Scheduler

W, G = 32, 4
PROMPT = list(range(10, 30))  # 20 tokens
NUM_NEW = 1000  # ~30 windows


class _Sink:
    def on_output(self, req, text, finished, meta):
        pass

    def on_error(self, req, message):
        raise AssertionError(message)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """~1 ms per tiny decode step on one thread vs ~30 ms on two on a busy 2-core machine."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def runner():
    # fp32, 2 layers: greedy ties cannot flip between the two runs; context beyond NUM_NEW
    return ModelRunner(None, load_format="dummy", preset="tiny", dtype="float32",
                       max_total_tokens=4096, max_running_requests=4,
                       config_overrides=dict(num_layers=2, sliding_window=W, global_tokens=G,
                                             max_position_embeddings=4096))


def _request(ids, num_new, rid="r"):
    params = SamplingParams(temperature=0, max_new_tokens=num_new, ignore_eos=True)
    return Req(rid=rid, input_ids=list(ids), params=params, sink=_Sink())


def _generate(sched: Scheduler, req: Req) -> int:
    """Run req to the end, checking the pool identity each step; returns peak own-KV slots."""
    sched.outputs.init_request(req)
    sched.add_request(req)
    peak = 0
    while sched.has_work:
        sched.step()
        sched.cache.check_integrity()
        peak = max(peak, sched.cache.num_held)
    return peak


@pytest.fixture(scope="module")
def runs(runner):
    """The same long greedy generation with freeing off, then on (fresh schedulers)."""
    off = Scheduler(runner, disable_window_free=True, log_interval=0)
    req_off = _request(PROMPT, NUM_NEW)
    peak_off = _generate(off, req_off)
    assert off.cache.flush()
    on = Scheduler(runner, log_interval=0)
    req_on = _request(PROMPT, NUM_NEW)
    peak_on = _generate(on, req_on)
    return dict(off=(req_off, peak_off), on=(req_on, peak_on, on))


def test_long_generation_holds_about_window_plus_globals(runs):
    req_on, peak_on, sched = runs["on"]
    _, peak_off = runs["off"]
    slack = sched.cache.window_free_chunk + 1  # chunked freeing + the token being decoded
    assert peak_on <= W + G + slack, peak_on
    # without freeing, every generated token's KV stays (the prompt sits in the tree)
    assert peak_off >= NUM_NEW - 2  # (measured between steps; the last one also releases)
    assert len(req_on.output_ids) == NUM_NEW


def test_freeing_does_not_change_greedy_tokens(runs):
    (req_off, _), (req_on, _, _) = runs["off"], runs["on"]
    assert req_on.output_ids == req_off.output_ids


def test_finished_request_leaves_tombstones_and_reuse_stops_at_the_first_hole(runs, runner):
    req_on, _, sched = runs["on"]
    cache = sched.cache
    assert cache.num_held == 0 and cache.num_protected == 0
    # the tree holds the prompt, [G.. prompt) was tree-owned, and the last tokens stay live
    full = req_on.fill_ids[:-1]  # the last sampled token was never forwarded
    assert cache.match(_request(full + [7], 1)) == len(PROMPT)
    # a new request sharing the prompt and part of the answer reuses only the prompt, and its
    # greedy continuation matches the original run (what it recomputes is recomputed right)
    nxt = _request(full[:100], 8, rid="again")
    _generate(sched, nxt)
    assert nxt.num_cached_tokens == len(PROMPT)
    assert nxt.output_ids == req_on.output_ids[80:88]
    cache.check_integrity()
    assert cache.flush()
    assert cache.num_free == cache.num_total  # nothing leaked, nothing freed twice
    runner.token_pool.check_integrity()


def test_small_pool_serves_a_generation_far_longer_than_the_pool():
    runner = ModelRunner(None, load_format="dummy", preset="tiny", dtype="float32",
                         max_total_tokens=64, max_running_requests=2,
                         config_overrides=dict(num_layers=1, sliding_window=16, global_tokens=2,
                                               max_position_embeddings=1024))
    sched = Scheduler(runner, log_interval=0)
    req = _request(range(5, 15), 300)
    _generate(sched, req)
    assert len(req.output_ids) == 300 and req.finish_reason["type"] == "length"
    assert sched.cache.flush() and sched.cache.num_free == sched.cache.num_total


# ---- CacheManager alone: which positions are freed, and what the tree gets

def _cache(**kw):
    return CacheManager(ReqToToken(4, 256), TokenPool(200), sliding_window=8, global_tokens=2,
                        window_free_chunk=4, **kw)


def _run(cache, req, num_decode):
    assert cache.admit(req)
    cache.extend(req, cache.alloc(req.extend_len))
    cache.cache_unfinished(req)
    for t in range(num_decode):
        req.output_ids.append(100 + t)
        cache.free_window_kv([req])
        cache.extend(req, cache.alloc(1))
        cache.check_integrity()


def test_only_request_owned_positions_past_the_globals_are_freed():
    cache = _cache()
    req = _request([1, 2, 3], 64)  # the prompt [0, 3) goes to the tree; G = 2 lies inside it
    _run(cache, req, 30)
    row = cache.req_to_token.read(req.req_pool_idx, 0, req.kv_len)
    assert req.window_freed_start == 3  # max(G, tree_len): the tree's prompt stays
    assert bool((row[:3] != 0).all())
    freed = row[req.window_freed_start: req.window_freed_end]
    assert not bool(freed.any())
    # every key a future query (position >= kv_len) sees is still live
    assert req.window_freed_end <= req.kv_len - 8 + 1
    assert bool((row[req.kv_len - 8 + 1:] != 0).all())
    cache.release(req)
    cache.check_integrity()
    assert cache.num_free + cache.num_evictable == cache.num_total


@pytest.mark.parametrize("disable", [False, True])
def test_release_after_freeing_gives_back_every_slot_once(disable):
    cache = _cache(disable_radix_cache=disable)
    a, b = _request([1, 2, 3, 4], 64), _request([1, 2, 3, 4], 64)
    _run(cache, a, 25)
    _run(cache, b, 25)  # same tokens: on release, b's slots duplicate the tree's
    for r in (a, b):
        cache.release(r)
        cache.check_integrity()
    assert cache.flush() and cache.num_free == cache.num_total
    cache.token_pool.check_integrity()


def test_truncate_into_the_freed_window_is_refused():
    cache = _cache()
    req = _request([1, 2, 3], 64)
    _run(cache, req, 30)
    with pytest.raises(ValueError, match="sliding window already freed"):
        cache.truncate(req, req.kv_len - 8)
    cache.check_integrity()
    # a truncate whose new queries see only live keys is fine (jump-forward's short rollbacks)
    ok_len = req.window_freed_end + 8 - 1
    assert ok_len < req.kv_len
    cache.truncate(req, ok_len)
    cache.check_integrity()
    assert req.kv_len == ok_len


def test_interleaved_window_frees_nothing_and_says_so(caplog):
    from sglite.runtime.models.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", sliding_window=8,
                                  sliding_window_layers=(True, False, True, True))
    with caplog.at_level(logging.INFO, logger="sglite.runtime.scheduler.cache_manager"):
        assert freeable_window(cfg) is None
    assert "no KV is freed" in caplog.text
    assert freeable_window(cfg.replace(sliding_window_layers=None)) == 8
    assert freeable_window(ModelConfig.from_preset("tiny")) is None


def test_retracted_request_resumes_from_the_live_prefix_only():
    cache = _cache()
    req = _request([1, 2, 3, 4], 64)
    _run(cache, req, 30)
    assert req.num_window_freed
    cache.retract(req)
    cache.check_integrity()
    assert req.num_window_freed == 0 and cache.num_held == 0
    assert cache.admit(req)  # resumes: the tree serves the prompt, then the first hole
    assert req.tree_len == 4
    cache.extend(req, cache.alloc(req.extend_len))  # recompute the rest (one extend)
    cache.cache_unfinished(req)  # the tree has these tokens on tombstones: we keep our slots
    assert req.tree_len == 4
    cache.check_integrity()
    cache.release(req)
    assert cache.flush() and cache.num_free == cache.num_total
