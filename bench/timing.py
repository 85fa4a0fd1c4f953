"""The event timer the GPU benchmarks share where they do not use triton's do_bench (bench/kernels.py)."""

from __future__ import annotations

import torch


def event_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of fn between CUDA events, after one untimed call (compiles, allocations).
    Eager: the host must queue fn faster than the GPU runs it for this to time the GPU."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]
