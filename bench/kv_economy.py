"""KV pool sizes for a Llama-3-8B shape under MHA / GQA / MQA / CLA / sliding window.

Measured from the pool itself: KVCache.for_model is built on the meta device (no memory touched)
from a dummy config, and bytes per token and capacity are read off the pool. Usage:
    .venv/bin/python bench/kv_economy.py [--budget-gib 1]
"""

from __future__ import annotations

import argparse
import platform

import torch

from sglite.runtime.config import ModelConfig
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
    args = parser.parse_args()
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
            # a request holds at most W + G slots (+1 for the token being decoded): KV that
            # slid out of every layer's window is freed, so length is bounded by the context
            # limit only, and the pool holds capacity // (W + G + 1) such requests at once
            resident = cfg.sliding_window + cfg.global_tokens + 1
            longest = "unbounded (holds <= W+G+1 = %d)" % resident
            concurrent = pool.capacity // min(resident, 8192)
        else:
            longest, concurrent = f"{pool.capacity}", pool.capacity // 8192
        print(f"| {name} | {pool.num_buffers} | {cfg.num_kv_heads} | {pool.bytes_per_token} "
              f"| {pool.capacity} | {pool.capacity / base:.0f}x | {longest} | {concurrent} |")


if __name__ == "__main__":
    main()
