"""The host mirror of req_to_token on CUDA: after every scheduler step (overlapped decode, CUDA
graphs, radix sharing, chunked prefill, requests finishing while a decode is in flight) each
running request's device row equals its mirror (CacheManager.check_integrity compares them), and
the tokens equal the plain loop's."""

import torch

from sglite.protocol import parse_sampling_params
from sglite.runtime.scheduler.req import Req
from tests.runtime.scheduler.sinks import RecordingSink


def _run(runner, prompts, *, overlap: bool):
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()
    sched = Scheduler(runner, max_running_requests=8, chunked_prefill_size=24, log_interval=0,
                      enable_overlap=overlap)
    reqs = []
    for i, prompt in enumerate(prompts):
        params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 3 + 5 * (i % 4)}
        req = Req(rid=f"r{i}", input_ids=prompt, params=parse_sampling_params(params), sink=RecordingSink())
        sched.outputs.init_request(req)
        sched.add_request(req)
        reqs.append(req)
    steps = 0
    while sched.has_work:
        sched.step()
        steps += 1
        sched.cache.check_integrity()
        assert steps < 500
    return [r.output_ids for r in reqs]


def test_mirror_matches_device_table():
    from sglite.runtime.executor.model_runner import ModelRunner

    runner = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", device="cuda",
                         max_total_tokens=4096, max_running_requests=8)
    gen = torch.Generator().manual_seed(0)
    vocab = runner.model_config.vocab_size
    shared = torch.randint(0, vocab, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, vocab, (3 + i,), generator=gen).tolist() for i in range(10)]
    assert _run(runner, prompts, overlap=True) == _run(runner, prompts, overlap=False)
    assert runner.req_to_token.host is not runner.req_to_token.table
