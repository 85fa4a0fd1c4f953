"""KV pool sizes for a Llama-3-8B shape under MHA / GQA / MQA / CLA / sliding window, and the
peak KV one long generation holds with sliding-window freeing on vs off.

Part 1 is measured from the pool itself: KVCache.for_model is built on the meta device (no memory
touched) from a dummy config, and bytes per token and capacity are read off the pool.
Part 2 runs a tiny windowed dummy model on CPU through the Scheduler in-process: one greedy
request (ignore_eos) generates --gen-tokens tokens, once with freeing off and once on, and the
pool's slots in use (total - free) are read after every step. Usage:
    .venv/bin/python bench/kv_economy.py [--budget-gib 1] [--gen-tokens 20000] [--window 512]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sglite.protocol import SamplingParams
from sglite.runtime.scheduler.cache_manager import MAX_WINDOW_FREE_CHUNK
from sglite.runtime.models.config import ModelConfig
from sglite.runtime.mem.kv_cache import KVCache

VARIANTS = {
    "MHA (baseline)": dict(num_kv_heads=32),
    "GQA-8": dict(num_kv_heads=8),
    "MQA": dict(num_kv_heads=1),
    "GQA-8 + CLA2": dict(num_kv_heads=8, cla_factor=2),
    "MQA + CLA2": dict(num_kv_heads=1, cla_factor=2),
    "GQA-8 + window 4096 + 4 global": dict(num_kv_heads=8, sliding_window=4096, global_tokens=4),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gen-tokens", type=int, default=20000, help="0: skip part 2")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--global-tokens", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for part 2 (tiny ops: more threads only add sync)")
    args = parser.parse_args()
    pool_sizes(args)
    if args.gen_tokens:
        long_generation(args)


def pool_sizes(args) -> None:
    dtype = getattr(torch, args.dtype)
    budget = int(args.budget_gib * 2**30)
    print(f"machine: {platform.machine()}, pool on the meta device; shape llama-3-8b "
          f"(32 layers, 32 q heads, head_dim 128), {args.dtype}, KV budget {args.budget_gib} GiB")
    print("| variant | KV buffers | kv heads | bytes/token | tokens in budget | vs MHA "
          "| longest request | concurrent 8k-token requests |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for name, overrides in VARIANTS.items():
        cfg = ModelConfig.from_preset("llama-3-8b", **overrides)
        pool = KVCache.for_model(cfg, dtype=dtype, device="meta", kv_memory_bytes=budget)
        base = base or pool.capacity
        if cfg.is_all_windowed:
            # a request holds at most W + G slots plus the chunk the scheduler frees at once
            # (CacheManager.free_window_kv): KV that slid out of every layer's window is freed,
            # so length is bounded by the context limit only, and the pool holds
            # capacity // (W + G + chunk) such requests at once
            chunk = max(1, min(MAX_WINDOW_FREE_CHUNK, cfg.sliding_window // 8))
            resident = cfg.sliding_window + cfg.global_tokens + chunk
            longest = f"unbounded (holds <= W+G+{chunk} = {resident})"
            concurrent = pool.capacity // min(resident, 8192)
        else:
            longest, concurrent = f"{pool.capacity}", pool.capacity // 8192
        print(f"| {name} | {pool.num_buffers} | {cfg.num_kv_heads} | {pool.bytes_per_token} "
              f"| {pool.capacity} | {pool.capacity / base:.0f}x | {longest} | {concurrent} |")


class _Sink:
    def on_output(self, req, text, finished, meta):
        pass

    def on_error(self, req, message):
        raise RuntimeError(message)


def long_generation(args) -> None:
    from sglite.runtime.executor.model_runner import ModelRunner
    from sglite.runtime.scheduler.req import Req
    from sglite.runtime.scheduler.scheduler import Scheduler

    torch.set_num_threads(args.threads)
    context = args.prompt_len + args.gen_tokens + 64
    # one layer, one KV head: the torch backend gathers the whole row per decode step, so a
    # bigger model only makes the no-freeing run slower without changing what is measured
    runner = ModelRunner(None, load_format="dummy", preset="tiny", dtype="float32",
                         max_total_tokens=context, max_running_requests=2,
                         config_overrides=dict(num_layers=1, num_kv_heads=1,
                                               sliding_window=args.window,
                                               global_tokens=args.global_tokens,
                                               max_position_embeddings=context))
    prompt = torch.randint(3, runner.model_config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    print(f"\nlong generation: tiny dummy model (1 layer, 1 kv head, fp32) on {_cpu_name()} "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}), window "
          f"W={args.window} + G={args.global_tokens} global on every layer, "
          f"{args.prompt_len}-token prompt, {args.gen_tokens} new tokens (greedy, ignore_eos)")
    print("| window freeing | peak KV slots in use | of which the request's own | final length "
          "| time s | steps/s |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, disable in (("off (baseline)", True), ("on", False)):
        sched = Scheduler(runner, disable_window_free=disable, log_interval=0)
        params = SamplingParams(temperature=0, max_new_tokens=args.gen_tokens, ignore_eos=True)
        req = Req(rid=name, input_ids=prompt, params=params, sink=_Sink())
        sched.outputs.init_request(req)
        sched.add_request(req)
        pool, peak_used, peak_own, num_steps = runner.token_pool, 0, 0, 0
        t0 = time.perf_counter()
        while sched.has_work:
            sched.step()
            num_steps += 1
            peak_used = max(peak_used, pool.total_size - pool.available_size)
            peak_own = max(peak_own, sched.cache.num_held)
        elapsed = time.perf_counter() - t0
        sched.cache.check_integrity()
        assert sched.cache.flush() and sched.cache.num_free == sched.cache.num_total
        results[name] = (peak_used, req.output_ids)
        print(f"| {name} | {peak_used} | {peak_own} | {req.seq_len} | {elapsed:.1f} "
              f"| {num_steps / elapsed:.0f} |")
    (off_peak, off_ids), (on_peak, on_ids) = results.values()
    print(f"peak ratio off / on: {off_peak / on_peak:.1f}x; W + G + prompt = "
          f"{args.window + args.global_tokens + args.prompt_len}; same greedy tokens: "
          f"{off_ids == on_ids}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
