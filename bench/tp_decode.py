"""Issue 21: batch-1 decode at tp 1 and tp N in the same call, beside each rank's weight-bandwidth
floor (its shard's weight bytes over the measured device copy bandwidth, bytes read plus written).

Random bf16 weights (load_format=dummy) at a preset's shape; a step is the runner's whole decode
path on rank 0 (batch build, the broadcast to the other ranks, forward with its all-reduces,
logits gathered, argmax read back), as bench/decode_floor.py measures it.

    python bench/tp_decode.py --preset llama-3-8b --tp 2                  # 2 GPUs (NCCL)
    python bench/tp_decode.py --preset tiny --tp 2 --device cpu --steps 8 # gloo smoke run

Each rank loads the whole model before keeping its shard (sglite.runtime.distributed), so a
shape runs only where one device holds all of its weights (not a 70B on an H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.decode_floor import copy_bandwidth, decode_loop, sync  # noqa: E402
from sglite.runtime.executor.model_runner import ModelRunner  # noqa: E402


def bench(args, tp: int) -> dict:
    device = torch.device(args.device)
    prompt = list(range(1, args.prompt_len + 1))
    runner = ModelRunner(load_format="dummy", preset=args.preset, device=args.device, dtype="bfloat16",
                         max_total_tokens=args.prompt_len + 2 * args.steps + 64, max_running_requests=2,
                         cuda_graph_max_bs=1, tp_size=tp)
    shard_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    row = runner.req_to_token.alloc()
    loc = runner.token_pool.alloc(len(prompt))
    last = runner.forward(runner.make_extend_batch([row], [0], [prompt], loc)).argmax(-1).tolist()
    step_s = [decode_loop(runner, row, len(prompt) + r * (args.steps + 3), last, args.steps)
              for r in range(2)]  # twice: the spread is the noise
    floor_s = shard_bytes / copy_bandwidth(device)
    if runner.tp is not None:
        runner.tp.close()
    del runner
    sync(device)
    return dict(tp=tp, ms_per_step=[round(s * 1e3, 3) for s in step_s],
                rank0_weight_gib=round(shard_bytes / 2**30, 3), floor_ms=round(floor_s * 1e3, 3),
                floor_ratio=round(floor_s / min(step_s), 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    args = p.parse_args()
    rows = [bench(args, 1), bench(args, args.tp)]
    for row in rows:
        print(json.dumps({"preset": args.preset, "device": args.device, **row}))
    base, tp = min(rows[0]["ms_per_step"]), min(rows[1]["ms_per_step"])
    print(json.dumps({"speedup_tp_vs_tp1": round(base / tp, 3)}))


if __name__ == "__main__":
    main()
