"""The runtime path of tensor parallelism: ModelRunner(tp_size=2) on the CPU spawns rank 1 and
shards both ranks over gloo; the scheduler, run on rank 0 only, produces the same greedy tokens as
a tp 1 runner for 32 steps (a batch of requests, chunked prefill, decode), while rank 1 follows
every forward."""

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


def _generate(runner, prompts):
    from sglite.runtime.scheduler.scheduler import Scheduler

    sched = Scheduler(runner, max_running_requests=4, chunked_prefill_size=16, log_interval=0)
    params = parse_sampling_params({"temperature": 0, "ignore_eos": True, "max_new_tokens": STEPS})
    reqs = [Req(rid=str(i), input_ids=p, params=params, sink=RecordingSink()) for i, p in enumerate(prompts)]
    for req in reqs:
        sched.outputs.init_request(req)
        sched.add_request(req)
    for _ in range(200):
        if not sched.has_work:
            break
        sched.step()
    assert all(r.sink.finished == 1 and r.sink.error is None for r in reqs)
    return [r.output_ids for r in reqs]


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 20, 3)]


def test_tp2_gives_tp1_greedy_tokens(prompts):
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = _generate(_runner(1), prompts)
        tp = _runner(2)
        assert tp.tp.world == 2 and tp.model_config.num_heads == 2 and tp.kv_cache.num_kv_heads == 1
        got = _generate(tp, prompts)
        worker = tp.tp.procs[0]
        tp.tp.close()
    finally:
        torch.set_num_threads(num_threads)
    assert [len(ids) for ids in want] == [STEPS] * len(prompts)
    assert len({t for ids in want for t in ids}) > 3  # not one repeated token
    assert got == want
    worker.join(timeout=10)
    assert worker.exitcode == 0  # rank 1 followed to the end and stopped when told
