"""The transformers baseline of bench/moe.py (part d): `generate` at each batch on the same
Qwen3-30B-A3B shape, timed step by step.

transformers 5's `generate` switches grouped_mm experts to batched_mm for its decode steps
(GenerationMixin._optimize_model_for_decode), and batched_mm copies each selected expert's weights
per token: at batch 64 that is 3.2 GB a layer and the step grows with the batch. Both are timed:
as shipped ("default") and with the switch turned off ("grouped_mm"); bench/moe.py's table takes
the faster as the baseline.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepClock:
    """A stopping criterion that never stops: it synchronizes and reads the clock each time
    generate calls it (once per new token), so that the intervals are the decode steps one by one
    (forward, sampling, bookkeeping). generate already waits on the GPU every step (its
    unfinished-sequences check), so the extra synchronize costs nothing it did not pay."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def part_hf(args, out: Path, shape: dict, emit):
    """transformers `generate` at each batch: the decode step as the median of the per-step
    intervals (_StepClock) after the first two steps, over args.hf_repeats runs of 2 + hf_steps
    tokens, each run after a warm-up of the same length; with --hf-slope also the slope of the
    best-of-repeats generate time over 2/6/10/18 tokens, which needs no hook. The baseline is the
    faster of the two (the less favourable to sglite). --hf-backends: generate as shipped and/or
    with grouped_mm kept for its decode steps (_decode_backend); the table's baseline is the
    fastest transformers figure at each batch. --hf-profile profiles one generate (CPU time vs
    GPU time; which kernels)."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    cfg = {k: v for k, v in shape.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.Qwen3MoeConfig(**cfg, initializer_range=0.02)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    try:
        with torch.device(dev):
            model = transformers.Qwen3MoeForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    default_impl = str(getattr(model.config, "_experts_implementation", None))
    emit(out, dict(part="hf_load", seconds=time.perf_counter() - t0, transformers=transformers.__version__,
                   experts_impl=default_impl, gpu_mem_gb=torch.cuda.memory_allocated() / 1e9 if cuda else 0))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for bs in args.batches:
            ids = torch.randint(0, shape["vocab_size"], (bs, args.prompt_len), generator=gen).to(dev)
            for backend in args.hf_backends:
                if backend == "default" and bs not in (args.hf_default_batches or args.batches):
                    continue
                if backend == "grouped_mm" and not hasattr(model, "_optimize_model_for_decode"):
                    emit(out, dict(part="hf_decode_skipped", batch=bs, impl=backend,
                                   why="this transformers has no decode-stage switch"))
                    continue
                with _decode_backend(model, backend):
                    hf_decode_at(args, out, emit, model, ids, bs, f"{default_impl}" if backend == "default"
                                 else f"{backend} kept for decode")
                if args.hf_profile and cuda and bs == args.batches[0] and backend == args.hf_backends[0]:
                    profile_hf(out, emit, _generate_fn(model, ids, args.prompt_len), bs)


@contextlib.contextmanager
def _decode_backend(model, backend: str):
    """"default": generate as shipped (transformers 5 switches grouped_mm experts to batched_mm for
    its decode stage, GenerationMixin._optimize_model_for_decode); "grouped_mm": that switch
    turned off, so the decode steps run grouped_mm too (the faster of the two at these batches:
    batched_mm copies every selected expert's weights per token)."""
    if backend == "default":
        yield
        return
    if backend != "grouped_mm":
        raise ValueError(f"unknown transformers decode backend {backend!r} (default, grouped_mm)")
    model._optimize_model_for_decode = contextlib.nullcontext  # instance attribute: the switch off
    try:
        yield
    finally:
        del model._optimize_model_for_decode


def hf_decode_at(args, out: Path, emit, model, ids, bs: int, impl: str):
    run = _generate_fn(model, ids, args.prompt_len)
    n_full = 2 + args.hf_steps
    run(n_full)  # warm-up at the longest length: allocator, kernels, handles
    steps, totals = [], []
    for _ in range(args.hf_repeats):
        clock = _StepClock()
        totals.append(run(n_full, clock))
        steps.append([b - a for a, b in zip(clock.times[1:], clock.times[2:])])
    flat = sorted(s for run_steps in steps for s in run_steps)
    row = dict(part="hf_decode", batch=bs, impl=impl, steps=args.hf_steps,
               ms_step_median=_median(flat) * 1e3, ms_step_min=flat[0] * 1e3, ms_step_max=flat[-1] * 1e3,
               ms_step_run_medians=[_median(sorted(s)) * 1e3 for s in steps], generate_s=totals)
    if args.hf_slope and bs in args.hf_slope_batches:  # generate(n) at several n: the fitted slope
        lens = [2, 6, 10, 18]
        secs = [min(run(n) for _ in range(args.hf_repeats)) for n in lens]
        mean_n, mean_s = sum(lens) / len(lens), sum(secs) / len(secs)
        slope = (sum((n - mean_n) * (t - mean_s) for n, t in zip(lens, secs))
                 / sum((n - mean_n) ** 2 for n in lens))
        row.update(slope_lens=lens, slope_seconds=secs, ms_step_slope=slope * 1e3)
    row["ms_step"] = min(row["ms_step_median"], row.get("ms_step_slope", float("inf")))
    row["tok_s"] = bs / (row["ms_step"] / 1e3)
    emit(out, row)


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    return (sorted_values[n // 2] + sorted_values[(n - 1) // 2]) / 2


def _generate_fn(model, ids, prompt_len: int):
    import torch

    bs = ids.shape[0]

    def run(n, clock=None):
        extra = {"stopping_criteria": [clock]} if clock is not None else {}
        sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **extra)
        sync()
        assert out.shape == (bs, prompt_len + n), out.shape
        return time.perf_counter() - t

    return run


def profile_hf(out: Path, emit, run, bs: int):
    """One generate(6) under the profiler: wall time vs the GPU's kernel time, and the top ops by
    CPU and by GPU time (moe_hf_profile.txt)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(6)
    wall = time.perf_counter() - t0
    avg = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in avg)
    launches = sum(e.count for e in avg if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    text = (prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70)
            + "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                                 max_name_column_width=70))
    (out / "moe_hf_profile.txt").write_text(text)
    emit(out, dict(part="hf_profile", batch=bs, tokens=6, wall_s=wall, gpu_busy_s=gpu_us / 1e6,
                   kernel_launches=launches))
