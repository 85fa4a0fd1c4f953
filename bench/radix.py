"""Radix cache on vs off: 64 requests sharing a 400-token prefix, through the real scheduler.

Runs in-process (no socket) on the embedded model: the same ModelRunner serves both modes, each
with a fresh Scheduler. Prints throughput for each mode, the ratio, and the scheduler's own time
per step (everything in step() except the forwards: admission, batch building, sampling, stops,
detokenization, cache bookkeeping).

    .venv/bin/python bench/radix.py [--num-requests 64] [--prefix-len 400] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sglite.protocol import SamplingParams
from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.scheduler.req import Req
from sglite.runtime.scheduler.scheduler import Scheduler


class _Collect:
    def __init__(self):
        self.done = 0

    def on_output(self, req, text, finished, meta):
        self.done += finished

    def on_error(self, req, message):
        raise RuntimeError(message)


def run(runner, *, disable_radix_cache: bool, prompts: list[list[int]], max_new_tokens: int):
    sched = Scheduler(runner, disable_radix_cache=disable_radix_cache, log_interval=0,
                      chunked_prefill_size=1024)
    sink = _Collect()
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        req = Req(rid=str(i), input_ids=ids, params=params, sink=sink)
        sched.outputs.init_request(req)
        sched.add_request(req)
    while sched.has_work:
        sched.step()
    elapsed = time.perf_counter() - t0
    sched.cache.check_integrity()
    assert sink.done == len(prompts) and sched.cache.flush()
    s = sched.stats
    return {"time": elapsed, "prefill_tokens": s.num_prefill_tokens,
            "tokens": sum(len(p) for p in prompts) + len(prompts) * max_new_tokens,
            "steps": s.num_steps, "sched_ms": 1000 * s.schedule_time / max(s.num_steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=400)
    ap.add_argument("--suffix-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    runner = ModelRunner(None, dtype=args.dtype, max_total_tokens=32768, max_running_requests=128)
    g = torch.Generator().manual_seed(0)
    vocab = runner.model_config.vocab_size
    prefix = torch.randint(100, vocab, (args.prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(100, vocab, (args.suffix_len,), generator=g).tolist()
               for _ in range(args.num_requests)]
    on = run(runner, disable_radix_cache=False, prompts=prompts, max_new_tokens=args.max_new_tokens)
    off = run(runner, disable_radix_cache=True, prompts=prompts, max_new_tokens=args.max_new_tokens)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, dtype {args.dtype}")
    print(f"{args.num_requests} requests: {args.prefix_len}-token shared prefix + "
          f"{args.suffix_len} own tokens, {args.max_new_tokens} new tokens each (greedy)")
    print(f"{'radix cache':<12} {'time s':>8} {'tokens/s':>9} {'prefilled':>10} {'steps':>6} "
          f"{'sched ms/step':>14}")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:<12} {r['time']:8.2f} {r['tokens'] / r['time']:9.1f} "
              f"{r['prefill_tokens']:10d} {r['steps']:6d} {r['sched_ms']:14.2f}")
    print(f"speed-up (on / off): {off['time'] / on['time']:.2f}x")


if __name__ == "__main__":
    main()
