"""Where the offline workload's time goes: bench/gpu_e2e.py part b's requests (1024 x 512 random
prompt tokens, 256 greedy new tokens, ignore_eos) through the Scheduler in this process (no
ZMQ, no detokenizer), on the Llama-3-8B shape with random bf16 weights and the GPU server's
defaults.

    python bench/offline_profile.py [--chunks 4096,8192] [--rounds 2]

First the timed runs (output tokens/s) for each chunked-prefill size, alternating; then one run
under torch.profiler: every kernel's time summed into groups, each group's share of the wall
time, the matmuls' TFLOP/s (every projection and LM-head FLOP of the run over the matmul kernels'
time), decode attention's GB/s (K and V bytes every decode step must read over its kernels' time)
and the GPU's idle time (wall minus kernel time). The baseline beside it: the card's
device-to-device copy rate and bf16 matmul rate, measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglite.protocol import parse_sampling_params  # noqa: E402
from sglite.runtime.executor.model_runner import ModelRunner  # noqa: E402
from sglite.runtime.scheduler.req import Req  # noqa: E402
from sglite.runtime.scheduler.scheduler import Scheduler  # noqa: E402
from tests.runtime.scheduler.sinks import RecordingSink  # noqa: E402
from timing import event_ms  # noqa: E402  (bench/timing.py)

NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS, MAX_RUNNING = 1024, 512, 256, 512
GROUPS = (  # kernel name pattern -> group, first match wins
    (r"nvjet|gemm|cutlass|xmma|cublas", "matmuls"),
    (r"_unpack_decode_batch", "sampling + batch staging"),
    (r"_decode_stage", "decode attention"),
    (r"_extend_", "extend attention"),
    (r"_rms_norm", "add + RMSNorm"),
    (r"_silu", "silu * mul"),
    (r"_rotary|_store_kv", "rotary + KV store"),
    (r"argmax|reduce_kernel|sort|softmax|topk", "sampling + batch staging"),
    (r"copy|Memset|Memcpy", "copies"),
)


def group_of(name: str) -> str:
    return next((g for pattern, g in GROUPS if re.search(pattern, name)), "other")


def best_matmul_rate(runner) -> float:
    """TFLOP/s of the fastest of the model's projections at a 4096-token chunk (median of 20)."""
    best = 0.0
    for w in {tuple(p.shape): p for n, p in runner.model.named_parameters() if p.dim() == 2 and "embed" not in n}.values():
        x = torch.randn(4096, w.shape[1], device=w.device, dtype=w.dtype)
        for _ in range(2):  # (event_ms warms up once more)
            torch.nn.functional.linear(x, w)
        ms = event_ms(lambda: torch.nn.functional.linear(x, w), reps=20)  # noqa: B023 (called here)
        best = max(best, 2 * x.shape[0] * w.numel() / ms / 1e9)
    return best


def copy_rate() -> float:
    """GB/s of a 512 MiB device-to-device copy, bytes read plus written (median of 20)."""
    src = torch.empty(1 << 28, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / event_ms(lambda: dst.copy_(src), reps=20) / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", default="4096", help="chunked-prefill sizes to time, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runner = ModelRunner(preset="llama-3-8b", load_format="dummy", device="cuda", dtype="bfloat16",
                         max_running_requests=MAX_RUNNING, page_size=128)
    cfg = runner.model_config
    sched = Scheduler(runner, chunked_prefill_size=4096, max_running_requests=MAX_RUNNING, log_interval=0,
                      enable_overlap=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
               for _ in range(NUM_REQUESTS)]

    def run(chunk: int, n: int = NUM_REQUESTS, new_tokens: int = NEW_TOKENS) -> float:
        sched.token_budget = chunk
        for i in range(n):
            req = Req(rid=f"r{i}", input_ids=prompts[i], sink=RecordingSink(), params=parse_sampling_params(
                {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0}))
            sched.outputs.init_request(req)
            sched.add_request(req)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while sched.has_work:
            sched.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        assert sched.cache.flush(), "requests still hold KV after the run"  # the next run starts cold
        return wall

    chunks = [int(c) for c in args.chunks.split(",")]
    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}; torch {torch.__version__}", flush=True)
    for chunk in chunks:  # warm-up: CUDA graphs, Triton specializations
        run(chunk, n=64, new_tokens=16)
    tok_s = collections.defaultdict(list)
    for _ in range(args.rounds):
        for chunk in chunks:
            wall = run(chunk)
            tok_s[chunk].append(NUM_REQUESTS * NEW_TOKENS / wall)
            print(f"  chunk {chunk}: {wall:.2f} s, {tok_s[chunk][-1]:.0f} output tok/s", flush=True)

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = run(chunks[0])
    per_group = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            per_group[group_of(e.name)] += (e.time_range.end - e.time_range.start) / 1e6
    busy = sum(per_group.values())

    copy_gbs, mm_tflops = copy_rate(), best_matmul_rate(runner)
    linear = sum(p.numel() for n, p in runner.model.named_parameters()
                 if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    head = cfg.vocab_size * cfg.hidden_size
    tokens = NUM_REQUESTS * (PROMPT_LEN + NEW_TOKENS - 1)  # the last token is sampled, never fed
    mm_flop = 2 * linear * tokens + 2 * head * NUM_REQUESTS * NEW_TOKENS
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16, all layers
    kv_bytes = NUM_REQUESTS * kv_token * sum(PROMPT_LEN + t + 1 for t in range(NEW_TOKENS - 1))
    print(f"\n{props.name}: profiled run (chunk {chunks[0]}): {wall:.2f} s wall, "
          f"{NUM_REQUESTS * NEW_TOKENS / wall:.0f} output tok/s; copy {copy_gbs:.0f} GB/s, best matmul "
          f"{mm_tflops:.0f} TFLOP/s (same run)")
    print("| group | s | share of wall | rate | baseline | ratio |\n| --- | --- | --- | --- | --- | --- |")
    for g, s in sorted(per_group.items(), key=lambda kv: -kv[1]):
        rate = ""
        if g == "matmuls":
            rate = f"| {mm_flop / s / 1e12:.0f} TFLOP/s | best matmul {mm_tflops:.0f} | {mm_flop / s / 1e12 / mm_tflops:.2f} |"
        elif g == "decode attention":
            rate = f"| {kv_bytes / s / 1e9:.0f} GB/s | copy {copy_gbs:.0f} | {kv_bytes / s / 1e9 / copy_gbs:.2f} |"
        print(f"| {g} | {s:.2f} | {s / wall:.1%} {rate or '| | | |'}")
    print(f"| GPU idle (wall - kernel time) | {wall - busy:.2f} | {(wall - busy) / wall:.1%} | | | |")
    serial = mm_flop / (mm_tflops * 1e12) + kv_bytes / (copy_gbs * 1e9)
    print(f"matmuls at the best rate + decode KV at the copy rate: {serial:.2f} s "
          f"({NUM_REQUESTS * NEW_TOKENS / serial:.0f} tok/s; this run at {serial / wall:.0%} of it)")
    for chunk, v in tok_s.items():
        print(f"chunk {chunk}: output tok/s {[round(x) for x in v]}")


if __name__ == "__main__":
    main()
