"""The runtime path of tensor parallelism: ModelRunner(tp_size=2) on the CPU spawns rank 1 and
shards both ranks over gloo; the scheduler, run on rank 0 only, produces the same greedy tokens as
a tp 1 runner for 32 steps (a batch of requests, chunked prefill, decode, prefixes shared in a
batch and found in the radix tree; also the overlapped loop, whose decodes take their input ids
from a tensor), while rank 1 follows every forward and req_to_token write."""

import pytest
import torch

from sglite.protocol import parse_sampling_params
from sglite.runtime.scheduler.req import Req
from tests.runtime.scheduler.sinks import RecordingSink

STEPS = 32


def _runner(tp_size):
    from sglite.runtime.executor.model_runner import ModelRunner

    # untied: tiny random weights with a tied head repeat one token under greedy decoding
    return ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=1024,
                       max_running_requests=4, config_overrides=dict(tie_word_embeddings=False),
                       tp_size=tp_size)


def _generate(runner, waves, *, overlap=False):
    """Each wave's requests to completion, one wave after another on one scheduler (so later
    waves hit the radix tree): their output ids and prompt tokens found cached."""
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()  # the previous run's tree (and its slots) goes with its Scheduler
    sched = Scheduler(runner, max_running_requests=4, chunked_prefill_size=16, log_interval=0,
                      enable_overlap=overlap)
    params = parse_sampling_params({"temperature": 0, "ignore_eos": True, "max_new_tokens": STEPS})
    out = []
    for prompts in waves:
        reqs = [Req(rid=f"{len(out)}.{i}", input_ids=p, params=params, sink=RecordingSink())
                for i, p in enumerate(prompts)]
        for req in reqs:
            sched.outputs.init_request(req)
            sched.add_request(req)
        for _ in range(300):
            if not sched.has_work:
                break
            sched.step()
        assert all(r.sink.finished == 1 and r.sink.error is None for r in reqs)
        out.append([(r.output_ids, r.num_cached_tokens) for r in reqs])
    return out


@pytest.fixture(scope="module")
def waves():
    """Wave 1: three prompts and one sharing 10 tokens with the first (an in-batch shared
    prefix); wave 2: prompts extending wave 1's (prefix hits in the tree)."""
    gen = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, 512, (n,), generator=gen).tolist()

    p = [ids(n) for n in (20, 7, 18)]
    return [[*p, p[0][:10] + ids(4)], [p[0] + ids(3), p[2][:12] + ids(5)]]


def test_tp2_gives_tp1_greedy_tokens(waves):
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = _generate(_runner(1), waves)
        tp = _runner(2)
        assert tp.tp.world == 2 and tp.model_config.num_heads == 2 and tp.kv_cache.num_kv_heads == 1
        got = _generate(tp, waves)
        # overlapped: each decode's input ids fed from the previous one's tensor (broadcast too)
        got_overlapped = _generate(tp, waves, overlap=True)
        worker = tp.tp.procs[0]
        tp.tp.close()
    finally:
        torch.set_num_threads(num_threads)
    outputs = [ids for wave in want for ids, _ in wave]
    assert [len(ids) for ids in outputs] == [STEPS] * len(outputs)
    assert len({t for ids in outputs for t in ids}) > 3  # not one repeated token
    assert all(cached > 0 for _, cached in want[1])  # wave 2 read wave 1's KV
    assert got == want
    assert got_overlapped == want
    worker.join(timeout=10)
    assert worker.exitcode == 0  # rank 1 followed to the end and stopped when told


def test_a_rank_that_fails_to_start_is_reported(monkeypatch):
    """Rank 1 is started with arguments its runner refuses (a real worker process that fails):
    rank 0 raises naming it instead of waiting in the group's set-up."""
    from sglite.runtime.distributed import runner as tp_runner
    from sglite.runtime.executor.model_runner import ModelRunner

    spawn = tp_runner._spawn_workers
    monkeypatch.setattr(tp_runner, "_spawn_workers", lambda init_args, device, port: spawn(
        dict(init_args, load_format="no-such-format"), device, port))
    with pytest.raises(RuntimeError, match="rank 1 exited with code 1"):
        ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=64,
                    max_running_requests=2, tp_size=2)


def test_a_head_count_that_does_not_split_is_refused_before_any_rank_starts():
    from sglite.runtime.executor.model_runner import ModelRunner

    with pytest.raises(ValueError, match="tp size 8"):  # 2 KV heads, 4 heads: 8 ranks cannot split
        ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=64,
                    max_running_requests=2, tp_size=8)
