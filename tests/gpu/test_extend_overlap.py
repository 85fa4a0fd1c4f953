"""Extends that sample nothing (a select's prefix and choices: prefill-only requests with input
logprobs) are read a step later on CUDA: launching one waits for nothing on the GPU (torch's sync
debug mode around the first scheduler steps: the only wait is the pending extend's read, after
the next launch), and the loop gives the same
input logprobs and finish reasons as the plain loop, with the host mirror of req_to_token equal
to the device table after every step."""

import contextlib
import traceback
import warnings

import pytest
import torch

from sglite.protocol import parse_sampling_params
from sglite.runtime.scheduler.req import Req
from tests.runtime.scheduler.sinks import RecordingSink

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def runner():
    from sglite.runtime.executor.model_runner import ModelRunner

    return ModelRunner(load_format="dummy", preset="tiny", dtype="float32", device="cuda",
                       max_total_tokens=8192, max_running_requests=16)


def _requests(runner):
    gen = torch.Generator().manual_seed(0)
    vocab = runner.model_config.vocab_size

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    shared = ids(60)  # a few-shot prefix shared by every "choice"
    out = [("prefix", shared, {"max_new_tokens": 0}, False)]
    out += [(f"c{i}", shared + ids(4 + i), {"max_new_tokens": 0}, True) for i in range(8)]
    out += [("gen", ids(30), {"temperature": 0, "ignore_eos": True, "max_new_tokens": 6}, True)]
    return out


@contextlib.contextmanager
def _sync_sites():
    """Every synchronizing CUDA call inside (torch's sync debug mode, "warn"), as the innermost
    sglite frame of its stack: all of them in one run, not only the first."""
    sites = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing CUDA operation" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "/sglite/" in f.filename]
        sites.append(f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames
                     else str(message))

    torch.cuda.synchronize()
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown


def _run(runner, *, overlap: bool, check_first_step_sync: bool = False):
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()
    sched = Scheduler(runner, max_running_requests=16, chunked_prefill_size=48, log_interval=0,
                      enable_overlap=overlap)
    reqs = {}
    for rid, prompt, params, scored in _requests(runner):
        lp = dict(return_logprob=True, logprob_start_len=1, top_logprobs_num=2) if scored else {}
        req = Req(rid=rid, input_ids=prompt, params=parse_sampling_params(params),
                  sink=RecordingSink(), **lp)
        sched.outputs.init_request(req)
        sched.add_request(req)
        reqs[rid] = req
    steps, pending_seen = 0, False
    sync_sites = []
    while sched.has_work:
        if steps < 3 and check_first_step_sync:  # launches behind a pending extend, then reads it
            with _sync_sites() as sites:
                sched.step()
            sync_sites += [s for s in sites if "pending.py" not in s]  # the read, after the launch
        else:
            sched.step()
        steps += 1
        pending_seen |= sched._pending_extend is not None
        sched.cache.check_integrity()
        assert steps < 200
    assert not sync_sites, "the launch waited for the GPU at:\n" + "\n".join(sync_sites)
    for req in reqs.values():
        assert req.sink.finished == 1 and req.sink.error is None, req.rid
    return reqs, pending_seen


def test_extend_read_a_step_later_matches_the_plain_loop(runner):
    plain, _ = _run(runner, overlap=False)
    over, pending_seen = _run(runner, overlap=True, check_first_step_sync=True)
    assert pending_seen
    for rid, req in plain.items():
        assert over[rid].output_ids == req.output_ids, rid
        assert over[rid].finish_reason == req.finish_reason, rid
        a = req.logprobs.get("input_token_logprobs", [])
        b = over[rid].logprobs.get("input_token_logprobs", [])
        assert len(a) == len(b), rid
        for (la, ta, _), (lb, tb, _) in zip(a, b):
            assert ta == tb and abs(la - lb) < 1e-3, rid
