"""Paths of bench/decode_floor.py beside its timed runner loop: the served graph checked against
eager launches, and the decode through the Scheduler (as served)."""

from __future__ import annotations

import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_paths(runner, row, prompt, steps: int = 8) -> dict:
    """The served path (graph replay: one-row GEMV, chained early launch) against the eager
    cuBLAS path (gemv.ENABLED off) on the same state, step by step: after the prompt's prefill,
    each step runs the graph, then the same step eagerly on cuBLAS (same slot, rewriting its K/V),
    then goes on with the graph's argmax. A race in the early launches shows as a large error."""
    from sglite.kernels import gemv

    runner.token_pool.reset()
    loc = runner.token_pool.alloc(len(prompt))
    last = runner.forward(runner.make_extend_batch([row], [0], [prompt], loc)).argmax(-1).tolist()
    seq, errs, eager_errs, same_top1 = len(prompt), [], [], 0
    for _ in range(steps):
        seq += 1
        slot = runner.token_pool.alloc(1)
        got = runner.forward_decode([row], [seq], last, slot)[0].float().clone()
        # the same kernels launched one by one (no graph): equal unless the graph's early
        # launches race (its K/V rewrite is the same values)
        eager = runner.forward_decode([row], [seq], last, slot, use_cuda_graph=False)[0].float().clone()
        gemv.ENABLED = False
        try:
            ref = runner.forward_decode([row], [seq], last, slot, use_cuda_graph=False)[0].float()
        finally:
            gemv.ENABLED = True
        errs.append(((got - ref).norm() / ref.norm()).item())
        eager_errs.append(((got - eager).norm() / eager.norm()).item())
        same_top1 += int(got.argmax(-1).item() == ref.argmax(-1).item())
        last = got.argmax(-1).tolist()
    return dict(max_rel_err=max(errs), mean_rel_err=sum(errs) / len(errs), same_top1=same_top1,
                max_rel_err_vs_eager_same_kernels=max(eager_errs), steps=steps)


def gemv_off_check(runner, row, prompt, recapture) -> None:
    """The same comparison with the GEMV off in both (cuBLAS graph vs cuBLAS eager): the spread
    two launch orders of the same cuBLAS kernels give, beside the GEMV's."""
    from sglite.kernels import gemv

    gemv.ENABLED = False
    try:
        if runner.graph_runner is not None:
            recapture(runner, runner.max_context_len)
        runner.token_pool.reset()
        loc = runner.token_pool.alloc(len(prompt))
        last = runner.forward(runner.make_extend_batch([row], [0], [prompt], loc)).argmax(-1).tolist()
        seq, errs = len(prompt), []
        for _ in range(4):
            seq += 1
            slot = runner.token_pool.alloc(1)
            got = runner.forward_decode([row], [seq], last, slot)[0].float().clone()
            ref = runner.forward_decode([row], [seq], last, slot, use_cuda_graph=False)[0].float()
            errs.append(((got - ref).norm() / ref.norm()).item())
            last = got.argmax(-1).tolist()
        print(f"cuBLAS graph vs cuBLAS eager, logits per step: max rel err {max(errs):.2e}", flush=True)
    finally:
        gemv.ENABLED = True


def graph_trace(runner, row, prompt, tokens=None, steps: int = 8):
    """Logits of `steps` decode steps (graph replays) after a fresh prefill, fed `tokens` (or each
    step's argmax) -> (logits [steps, V] fp32, the tokens fed). Two traces of graphs that compute
    the same function in the same order (a fused epilogue with the same roundings, an earlier
    launch) must be bit-equal on the same tokens: a race shows as a difference."""
    runner.token_pool.reset()
    loc = runner.token_pool.alloc(len(prompt))
    last = runner.forward(runner.make_extend_batch([row], [0], [prompt], loc)).argmax(-1).tolist()
    seq, out, fed = len(prompt), [], []
    for i in range(steps):
        seq += 1
        tok = last if tokens is None else [tokens[i]]
        fed.append(tok[0])
        logits = runner.forward_decode([row], [seq], tok, runner.token_pool.alloc(1))[0].float().clone()
        out.append(logits.reshape(-1))
        last = logits.argmax(-1).reshape(-1).tolist()
    return torch.stack(out), fed


class _Sink:
    def on_output(self, req, text, finished, meta):
        pass

    def on_error(self, req, message):
        raise RuntimeError(message)


def scheduler_decode(args, runner, prompt) -> list[float]:
    """Seconds per decode step of one request through the Scheduler (as served: its overlapped
    loop, CUDA graphs), two windows of args.steps steps after the prefill and 3 steps."""
    from sglite.protocol import SamplingParams
    from sglite.runtime.scheduler.req import Req
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()
    sched = Scheduler(runner, max_running_requests=1, chunked_prefill_size=len(prompt), log_interval=0)
    params = SamplingParams(temperature=0, max_new_tokens=2 * args.steps + 16, ignore_eos=True)
    req = Req(rid="r0", input_ids=list(prompt), params=params, sink=_Sink())
    sched.outputs.init_request(req)
    sched.add_request(req)
    while len(req.output_ids) < 2:
        sched.step()
    for _ in range(3):
        sched.step()
    windows = []
    for _ in range(2):
        sync(runner.device)
        before, t0 = len(req.output_ids), time.perf_counter()
        for _ in range(args.steps):
            sched.step()
        sync(runner.device)
        windows.append((time.perf_counter() - t0) / (len(req.output_ids) - before))
    while sched.has_work:
        sched.step()
    return windows
