"""The scheduler's own CPU cost per decode step (issue 6), on CPU with a tiny dummy model.

N requests (token ids, ignore_eos, greedy) run through an in-process Scheduler; after all are
admitted, every step is a pure decode step of N requests. Reported: the scheduler's time per
decode step excluding forwards (Stats.schedule_time; on CPU the forward is synchronous, so this
is the CPU work a GPU step would have to hide), and the forward time for scale.

    .venv/bin/python bench/scheduler_cpu.py --bs 64,256 [--profile]
    .venv/bin/python bench/scheduler_cpu.py --bs 256 --num-requests 1024 --chunked-prefill 128
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from sglite.protocol import parse_sampling_params
from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.scheduler.req import Req
from sglite.runtime.scheduler.scheduler import Scheduler


class Sink:
    def __init__(self):
        self.outputs = 0

    def on_output(self, req, text, finished, meta):
        self.outputs += 1

    def on_error(self, req, message):
        raise RuntimeError(message)


def run(bs: int, *, prompt_len: int, output_len: int, profile: bool, num_requests: int = 0,
        chunked_prefill: int = 0) -> dict:
    """num_requests > bs: a steady state (requests finish and new ones are admitted, in chunks of
    chunked_prefill tokens, every few steps) instead of pure decode."""
    num_requests = num_requests or bs
    runner = ModelRunner(load_format="dummy", preset="tiny", max_running_requests=bs,
                         max_total_tokens=num_requests * (prompt_len + output_len + 8))
    sched = Scheduler(runner, max_running_requests=bs, log_interval=0,
                      chunked_prefill_size=chunked_prefill or bs * prompt_len)
    vocab = runner.model_config.vocab_size
    params = parse_sampling_params({"temperature": 0, "max_new_tokens": output_len,
                                    "ignore_eos": True})
    sink = Sink()
    for i in range(num_requests):
        req = Req(rid=str(i), input_ids=torch.randint(0, vocab, (prompt_len,)).tolist(),
                  params=params, sink=sink)
        sched.outputs.init_request(req)
        sched.add_request(req)
    sched.step()  # the extend of every prompt (+ the first decode)
    sched.step()
    s = sched.stats
    sched0, fwd0, steps0, t0 = s.schedule_time, s.forward_time, s.num_steps, time.perf_counter()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    while sched.has_work:
        sched.step()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    steps = s.num_steps - steps0
    assert sink.outputs == num_requests, f"{sink.outputs} outputs for {num_requests} requests"
    sched.cache.check_integrity()
    return dict(bs=bs, steps=steps, sched_ms=(s.schedule_time - sched0) / steps * 1e3,
                fwd_ms=(s.forward_time - fwd0) / steps * 1e3,
                wall_ms=(time.perf_counter() - t0) / steps * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", default="64,256")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=0, help="> bs: steady state")
    ap.add_argument("--chunked-prefill", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| bs | decode steps | scheduler ms/step (excl. forward) | forward ms/step | wall ms/step |")
    print("|---|---|---|---|---|")
    for bs in map(int, args.bs.split(",")):
        r = run(bs, prompt_len=args.prompt_len, output_len=args.output_len, profile=args.profile,
                num_requests=args.num_requests, chunked_prefill=args.chunked_prefill)
        print(f"| {r['bs']} | {r['steps']} | {r['sched_ms']:.2f} | {r['fwd_ms']:.2f} | "
              f"{r['wall_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
