"""Host time of applying 256 grammar masks to a decode's logits while a forward is in flight (issue 15:
the sampling phase of a JSON batch cost 4 ms a step on an H200 host). Baseline beside it in the same run:
the same masks through plain torch ops (shift, compare, masked_fill; no Triton launch): the unpack of
32-bit words the 20:37 call timed, and the runtime's apply (`apply_bitmask`: bytes unpacked, all rows in
place; half the rows: gathered, masked, scattered back).

    python bench/grammar_apply.py      # a CUDA machine
"""

from __future__ import annotations

import time

import torch
import xgrammar as xgr

from sglite.runtime.executor.transfer import tensor_async
from sglite.runtime.sampling.constrained import apply_bitmask


def main():
    dev = torch.device("cuda")
    bs, vocab = 256, 49152
    logits = torch.randn(bs, vocab, device=dev)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (bs, words), dtype=torch.int32).pin_memory()
    rows = list(range(bs))
    shifts = torch.arange(32, device=dev, dtype=torch.int32)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def xgrammar_path():
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(dev, non_blocking=True), vocab_size=vocab,
                                        indices=tensor_async(rows, torch.int32, dev))

    def torch_path():
        m = bitmask.to(dev, non_blocking=True)
        bits = (m.unsqueeze(-1) >> shifts) & 1
        logits.masked_fill_(bits.view(bs, -1)[:, :vocab] == 0, float("-inf"))

    def runtime_path():
        apply_bitmask(logits, bitmask.to(dev, non_blocking=True), rows)

    def runtime_half_rows():
        apply_bitmask(logits, bitmask.to(dev, non_blocking=True), rows[::2])

    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| path | host us a call, GPU idle | host us a call, forward in flight | GPU us a call |\n|---|---|---|---|")
    paths = (("xgrammar Triton apply + row index", xgrammar_path), ("torch, 32-bit unpack", torch_path),
             ("runtime apply_bitmask (torch, byte unpack)", runtime_path),
             ("runtime apply_bitmask, every other row", runtime_half_rows))
    for name, fn in paths:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        idle = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        busy = []
        for _ in range(20):
            for _ in range(10):
                a @ a  # ~10 ms of GPU work queued ahead, as a decode forward is
            t0 = time.perf_counter()
            fn()
            busy.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            fn()
        end.record()
        end.synchronize()
        print(f"| {name} | {idle:.1f} | {sorted(busy)[10] * 1e6:.1f} | {start.elapsed_time(end) / 200 * 1e3:.1f} |")
    ref = torch.randn(bs, vocab, device=dev)
    logits.copy_(ref)
    xgrammar_path()
    x = logits.clone()
    for name, fn in paths[1:3]:
        logits.copy_(ref)
        fn()
        print(f"same masked logits, {name}:", torch.equal(x, logits))


if __name__ == "__main__":
    main()
