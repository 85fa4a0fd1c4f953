"""FP8 (issue 19) on the GPU, bf16 beside it in the same call:

g. linear layers at Llama-3-8B shapes: bf16 F.linear vs the FP8 paths (Triton W8A16 tiles, per-token
   quant + torch._scaled_mm), by rows M; the fastest Triton tile per shape is used by part a;
a. batch-1 decode ms/token, FP8 weights vs bf16 (CUDA graphs, the runner's whole step);
k. FP8 KV pool: capacity in the same memory, and decode attention reading FP8 vs bf16 pages
   (bs 64 x 4096, bs 1 x 32k) as a share of the d2d copy bandwidth (bytes actually read);
b. offline N x (prompt, output) through `sglite serve`, FP8 weights vs bf16;
p. (not in the default parts) batch-1 graph replay profiled kernel by kernel: bf16, FP8;
s. (not in the default parts) SmolLM2-135M's small layers at prefill rows: bf16, the W8A16 kernel
   (fp8_path's "triton" for small layers up to SMALL_LAYER_MAX_M rows) and per-token FP8 + cuBLAS,
   device time (do_bench, weights rotated past L2) and eager wall time per call (host launch included).

    python bench/fp8.py --model .benchmodel          # H200 (carry .whl, .benchmodel)
Accuracy on the embedded SmolLM2 is bench/fp8_accuracy.py (its docstring says how its 98 MB GGUF
reaches the device machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from gpu_e2e import capture_graph, copy_bandwidth, decode_loop, sync  # noqa: E402

from sglite.kernels import fp8_gemm  # noqa: E402
from sglite.runtime.executor.model_runner import ModelRunner  # noqa: E402

ROWS: list[tuple] = []  # (case, fp8, baseline name, baseline, ratio, note)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TRITON_TILES = [  # one row (BLOCK_M 1: fp8_gemv.py; bench/fp8_gemv_sweep.py sweeps more), then 2-64 rows
    dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, VEC=8, num_warps=4, num_stages=1, PDL=True),
    dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=2048, VEC=8, num_warps=8, num_stages=1, PDL=True),
    dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, VEC=8, num_warps=4, num_stages=1),
    dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=2048, VEC=8, num_warps=8, num_stages=1),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=4),
]


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_gemm(args, device):
    """Per shape and M: bf16, scaled_mm (with its activation quant), the best Triton tile."""
    best = {}
    for name, (n, k) in SHAPES.items():
        copies = max(1, -(-(256 << 20) // (n * k)))  # fp8 weights over 256 MiB: out of L2
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        wq, ws = fp8_gemm_quant(w)
        wqs = [wq.clone() for _ in range(copies)]
        wbs = [w.clone() for _ in range(max(1, copies // 2))]
        for m in args.gemm_m:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = x.float() @ (wq.float() * ws[:, None]).T
            it = iter(range(1 << 30))
            t_bf16 = bench_ms(lambda: F.linear(x, wbs[next(it) % len(wbs)]))
            t_mm = bench_ms(lambda: fp8_scaled(x, wqs[next(it) % copies], ws))
            err_mm = rel(fp8_scaled(x, wq, ws), ref)
            t_fa = bench_ms(lambda: fp8_scaled(x, wqs[next(it) % copies], ws, fast=True))
            err_fa = rel(fp8_scaled(x, wq, ws, fast=True), ref)
            t_tw = bench_ms(lambda: fp8_tensorwise(x, wqs[next(it) % copies], ws))
            err_tw = rel(fp8_tensorwise(x, wq, ws), ref)
            t_path = bench_ms(lambda: fp8_gemm.fp8_linear(x, wqs[next(it) % copies], ws))
            t_tri, tile, err_tri = float("inf"), None, float("nan")
            if m <= 64:
                for cfg in TRITON_TILES:
                    if (cfg["BLOCK_M"] == 1) != (m == 1):
                        continue
                    try:
                        out = fp8_gemm.w8a16_matmul(x, wq, ws, tiles=cfg)
                        t = bench_ms(lambda: fp8_gemm.w8a16_matmul(x, wqs[next(it) % copies], ws, tiles=cfg))
                    except Exception as e:  # a tile that does not compile here
                        print(f"tile {cfg} failed: {e!r}"[:300])
                        continue
                    if t < t_tri:
                        t_tri, tile, err_tri = t, cfg, rel(out, ref)
                best[(m, n, k)] = tile
            path = fp8_gemm.fp8_path(m, n)
            print(f"gemm {name} M={m}: bf16 {t_bf16 * 1e3:.1f} us, rowwise {t_mm * 1e3:.1f} us (err {err_mm:.1e}), "
                  f"rowwise fast-accum {t_fa * 1e3:.1f} us (err {err_fa:.1e}), tensorwise {t_tw * 1e3:.1f} us (err {err_tw:.1e}), triton {t_tri * 1e3:.1f} us "
                  f"(err {err_tri:.1e}) {tile}; fp8_linear ({path}) {t_path * 1e3:.1f} us", flush=True)
            gbs = n * k / (t_tri * 1e-3) / 1e9 if tile else float("nan")
            ROWS.append((f"g. {name} {n}x{k} M={m} us, fp8_linear ({path})", t_path * 1e3, "bf16 F.linear us",
                         t_bf16 * 1e3, t_bf16 / t_path, f"rowwise {t_mm * 1e3:.1f}, fast-accum {t_fa * 1e3:.1f}, tensorwise {t_tw * 1e3:.1f}, "
                         f"triton {t_tri * 1e3:.1f} ({gbs:.0f} GB/s of fp8 weights) tile {tile}"))
        del w, wq, wqs, wbs
        torch.cuda.empty_cache()
    return best


SMALL_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # SmolLM2-135M
SMALL_TILES = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
               dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
               dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)]


def eager_ms(fn, calls=200) -> float:
    """Wall ms per call of `calls` back-to-back eager calls (host launch cost included), synced once."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def bench_small(args, device):
    """Part s: the small layers' path choice (fp8_path's SMALL_LAYER rule), by rows M."""
    for name, (n, k) in SMALL_SHAPES.items():
        copies = max(1, -(-(256 << 20) // (n * k)))
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        wq, ws = fp8_gemm_quant(w)
        wqs = [wq.clone() for _ in range(copies)]
        wbs = [w.clone() for _ in range(max(1, copies // 2))]
        for m in (32, 64, 256, 512, 1024, 2048, 4096):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = x.float() @ (wq.float() * ws[:, None]).T
            it = iter(range(1 << 30))
            t_bf16 = bench_ms(lambda: F.linear(x, wbs[next(it) % len(wbs)]))
            t_fa = bench_ms(lambda: fp8_scaled(x, wqs[next(it) % copies], ws, fast=True))
            e_bf16 = eager_ms(lambda: F.linear(x, wbs[next(it) % len(wbs)]))
            e_fa = eager_ms(lambda: fp8_scaled(x, wqs[next(it) % copies], ws, fast=True))
            cells = []
            best = (float("inf"), None, float("nan"))
            for cfg in [None] + SMALL_TILES:
                try:
                    out = fp8_gemm.w8a16_matmul(x, wq, ws, tiles=cfg)
                    t = bench_ms(lambda: fp8_gemm.w8a16_matmul(x, wqs[next(it) % copies], ws, tiles=cfg))
                except Exception as e:
                    print(f"small tile {cfg} failed: {e!r}"[:300])
                    continue
                cells.append(f"{t * 1e3:.1f}")
                if t < best[0]:
                    best = (t, cfg, rel(out, ref))
            e_tri = eager_ms(lambda: fp8_gemm.w8a16_matmul(x, wqs[next(it) % copies], ws))
            err_fa = rel(fp8_scaled(x, wq, ws, fast=True), ref)
            path = fp8_gemm.fp8_path(m, n, k)
            print(f"small {name} {n}x{k} M={m}: device us bf16 {t_bf16 * 1e3:.1f}, rowwise+quant {t_fa * 1e3:.1f} "
                  f"(err {err_fa:.1e}), triton default/tiles {'/'.join(cells)} (best err {best[2]:.1e}, {best[1]}); "
                  f"eager us bf16 {e_bf16 * 1e3:.1f}, rowwise {e_fa * 1e3:.1f}, triton {e_tri * 1e3:.1f}; path {path}",
                  flush=True)
            ROWS.append((f"s. {name} {n}x{k} M={m} device us, W8A16 default tile", float(cells[0]) if cells else float("nan"),
                         "rowwise+quant us", t_fa * 1e3, t_fa * 1e3 / float(cells[0]) if cells else float("nan"),
                         f"bf16 {t_bf16 * 1e3:.1f}; eager us bf16/rowwise/triton {e_bf16 * 1e3:.1f}/{e_fa * 1e3:.1f}/"
                         f"{e_tri * 1e3:.1f}; fp8_path {path}"))
        del w, wq, wqs, wbs
        torch.cuda.empty_cache()


def fp8_gemm_quant(w):
    from sglite.runtime.models.quant.fp8 import quantize_per_channel

    return quantize_per_channel(w)


def fp8_scaled(x, wq, ws, fast=False):
    xq, xs = fp8_gemm.quantize_rows(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=x.dtype, use_fast_accum=fast)


def fp8_tensorwise(x, wq, ws):
    xq, xs = fp8_gemm.quantize_rows(x)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    out = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=x.dtype)
    return fp8_gemm.scale_rows_cols(out, xs, ws)


def prefill_one(runner) -> tuple[int, list[int]]:
    """A request row with 128 random prompt tokens prefilled: (row, its greedy next token)."""
    row = runner.req_to_token.alloc()
    prompt = torch.randint(0, runner.model_config.vocab_size, (128,)).tolist()
    last = runner.forward(runner.make_extend_batch([row], [0], [prompt], runner.token_pool.alloc(128))
                          ).argmax(-1).tolist()
    return row, last


def replay_seconds(device, graph, n: int) -> float:
    """Seconds per replay of a captured graph, n back to back."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    sync(device)
    return (time.perf_counter() - t0) / n


def bench_batch1(args, device, copy_bw):
    results = {}
    for name, quant in (("bf16", None), ("fp8", "fp8")):
        runner = ModelRunner(args.model, load_format="dummy", device=str(device), dtype="bfloat16",
                             max_total_tokens=4096, max_running_requests=2, cuda_graph_max_bs=1,
                             quantization=quant)
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        row, last = prefill_one(runner)
        step_s = decode_loop(runner, [row], [128], last, args.decode_steps)
        graph = runner.graph_runner.graphs[1]
        replay_s = replay_seconds(device, graph, args.decode_steps)
        results[name] = (step_s, replay_s, weight_bytes)
        print(f"batch-1 {name}: {step_s * 1e3:.3f} ms/token, replay {replay_s * 1e3:.3f} ms, "
              f"weights {weight_bytes / 1e9:.2f} GB (floor {weight_bytes / copy_bw * 1e3:.2f} ms)", flush=True)
        lin_s, lin_bytes = linears_alone(runner, device)
        print(f"batch-1 {name}: the {len(lin_bytes)} decoder linears alone in one graph {lin_s * 1e3:.3f} ms "
              f"({sum(lin_bytes) / lin_s / 1e9:.0f} GB/s of their weights); the rest of the replay "
              f"{(replay_s - lin_s) * 1e3:.3f} ms", flush=True)
        if quant and fp8_gemm.TILE_OVERRIDES:  # the same weights with the default one-row tiles
            from sglite.runtime.executor.cuda_graph import CudaGraphRunner

            saved = dict(fp8_gemm.TILE_OVERRIDES)
            fp8_gemm.TILE_OVERRIDES.clear()
            runner.graph_runner = CudaGraphRunner(runner, max_bs=1)
            other_s = decode_loop(runner, [row], [128 + args.decode_steps + 3], last, args.decode_steps)
            lin_d, _ = linears_alone(runner, device)
            fp8_gemm.TILE_OVERRIDES.update(saved)
            print(f"batch-1 fp8, default tiles: {other_s * 1e3:.3f} ms/token, linears alone {lin_d * 1e3:.3f} ms "
                  f"(overrides {saved}: {step_s * 1e3:.3f}, {lin_s * 1e3:.3f})", flush=True)
            ROWS.append(("a. bs1 decode tokens/s, FP8, tile overrides", 1 / step_s, "default tiles tokens/s",
                         1 / other_s, other_s / step_s, f"same runner, graph recaptured; linears alone "
                         f"{lin_s * 1e3:.3f} vs {lin_d * 1e3:.3f} ms"))
        elif quant:  # the same weights, the W8A16 kernel not letting its dependents launch early
            from sglite.runtime.executor.cuda_graph import CudaGraphRunner

            early = fp8_gemm.EARLY_DEPENDENTS
            fp8_gemm.EARLY_DEPENDENTS = not early
            runner.graph_runner = CudaGraphRunner(runner, max_bs=1)
            other_s = decode_loop(runner, [row], [128 + args.decode_steps + 3], last, args.decode_steps)
            fp8_gemm.EARLY_DEPENDENTS = early
            print(f"batch-1 fp8, EARLY_DEPENDENTS {not early}: {other_s * 1e3:.3f} ms/token "
                  f"(EARLY_DEPENDENTS {early}: {step_s * 1e3:.3f})", flush=True)
            ROWS.append((f"a. bs1 decode tokens/s, FP8, EARLY_DEPENDENTS {early}", 1 / step_s,
                         f"EARLY_DEPENDENTS {not early} tokens/s", 1 / other_s, other_s / step_s,
                         "same runner, graph recaptured"))
        del runner, graph
        torch.cuda.empty_cache()
    (b_s, b_r, b_w), (f_s, f_r, f_w) = results["bf16"], results["fp8"]
    ROWS.append(("a. bs1 decode tokens/s, FP8 weights", 1 / f_s, "bf16 tokens/s", 1 / b_s, b_s / f_s,
                 f"ms/token {f_s * 1e3:.2f} vs {b_s * 1e3:.2f}; replay alone {f_r * 1e3:.2f} vs {b_r * 1e3:.2f} ms; "
                 f"weights {f_w / 1e9:.2f} vs {b_w / 1e9:.2f} GB, floors {f_w / copy_bw * 1e3:.2f} / "
                 f"{b_w / copy_bw * 1e3:.2f} ms"))


def linears_alone(runner, device):
    """Seconds for one row through every decoder linear layer (qkv, o, gate_up, down of each
    layer, the LM head excluded) back to back in one CUDA graph, and their weight bytes."""
    from sglite.runtime.models.layers.linear import MergedLinear, QuantLinear, linear_forward

    mods = [m for n, m in runner.model.named_modules()
            if isinstance(m, (torch.nn.Linear, QuantLinear, MergedLinear)) and "lm_head" not in n]
    xs = {m.in_features: torch.randn(1, m.in_features, device=device, dtype=torch.bfloat16) for m in mods}
    calls = [lambda m=m: linear_forward(m, xs[m.in_features]) for m in mods]
    ms = graph_ms(calls) * len(calls)  # the whole graph's replay
    return ms * 1e-3, [m.weight.numel() * m.weight.element_size() for m in mods]


def kernel_class(name: str) -> str:
    n = name.lower()
    for key, cls in (("w8a16", "fp8 W8A16 linear"), ("fp8_gemv", "fp8 W8A16 linear"), ("quant_rows", "fp8 act quant"), ("scale_out", "fp8 epilogue"),
                     ("decode", "attention"), ("attn", "attention"), ("attention", "attention"),
                     ("norm", "norm"), ("rotary", "rotary"), ("rope", "rotary"), ("gemv", "cuBLAS/gemv"),
                     ("gemm", "cuBLAS/gemv"), ("nvjet", "cuBLAS/gemv"), ("cutlass", "cuBLAS/gemv"),
                     ("xmma", "cuBLAS/gemv"), ("silu", "act"), ("act", "act"), ("argmax", "sampling"),
                     ("copy", "copy/elementwise"), ("elementwise", "copy/elementwise"), ("fill", "copy/elementwise")):
        if key in n:
            return cls
    return "other"


def replay_profile(graph, device, replays: int, trace_path: str | None):
    """Kernels of `replays` back-to-back replays of one CUDA graph under torch.profiler: per replay,
    each kernel name's device time, the union of kernel intervals (busy) and the span (first start
    to last end), so span - busy is the idle time between kernels."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        graph.replay()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        sync(device)
    import tempfile

    path = trace_path or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    if trace_path is None:
        os.remove(path)
    if not events:
        return None
    events.sort(key=lambda e: e["ts"])
    by_name: dict[str, list] = {}
    busy, end = 0.0, -1e30
    for e in events:
        s, d = float(e["ts"]), float(e["dur"])
        busy += max(0.0, s + d - max(s, end))
        end = max(end, s + d)
        row = by_name.setdefault(e["name"], [0, 0.0])
        row[0] += 1
        row[1] += d
    span = end - float(events[0]["ts"])
    return dict(n=len(events) / replays, busy_us=busy / replays, span_us=span / replays,
                kernels={k: (c / replays, t / replays) for k, (c, t) in by_name.items()})


def _profile_replays(args, device, runner, name, out_dir):
    """One runner's batch-1 graph: its decode step and replay time, then the replays profiled
    (kernels, span, busy), printed; None if the profiler recorded no kernel."""
    row, last = prefill_one(runner)
    step_s = decode_loop(runner, [row], [128], last, 16)
    graph = runner.graph_runner.graphs[1]
    replay_ms = replay_seconds(device, graph, args.decode_steps) * 1e3
    trace = os.path.join(out_dir, f"trace_{name}.json") if out_dir else None
    prof = replay_profile(graph, device, 20, trace)
    if trace and os.path.exists(trace):  # keep $OUT small: gzip the raw trace
        import gzip
        import shutil

        with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
            shutil.copyfileobj(f, g)
        os.remove(trace)
    if prof is None:
        print(f"profile {name}: no kernel events recorded", flush=True)
        return None
    prof.update(step_ms=step_s * 1e3, replay_ms=replay_ms)
    print(f"profile {name}: step {step_s * 1e3:.3f} ms, replay {replay_ms:.3f} ms; per replay "
          f"{prof['n']:.0f} kernels, span {prof['span_us']:.1f} us, busy {prof['busy_us']:.1f} us, "
          f"idle {prof['span_us'] - prof['busy_us']:.1f} us", flush=True)
    top = sorted(prof["kernels"].items(), key=lambda kv: -kv[1][1])[:25]
    for kname, (cnt, us) in top:
        print(f"   {us:9.1f} us  {cnt:5.0f} x {us / cnt:7.2f} us  [{kernel_class(kname)}] {kname[:110]}")
    return prof


def bench_profile(args, device, copy_bw):
    """Part p: where batch-1's replay time goes, bf16 vs FP8,
    kernel by kernel from a profile of back-to-back graph replays (the same graphs part a times)."""
    out_dir = os.environ.get("OUT")
    profiles = {}
    for name, quant in (("bf16", None), ("fp8", "fp8")):
        runner = ModelRunner(args.model, load_format="dummy", device=str(device), dtype="bfloat16",
                             max_total_tokens=4096, max_running_requests=2, cuda_graph_max_bs=1,
                             quantization=quant)
        prof = _profile_replays(args, device, runner, name, out_dir)
        if prof is not None:
            profiles[name] = prof
        del runner
        torch.cuda.empty_cache()
    classes = sorted({kernel_class(k) for p in profiles.values() for k in p["kernels"]})
    names = list(profiles)
    print("\n| class (us per replay: count x) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for cls in classes:
        cells = []
        for v in names:
            ks = [(c, t) for k, (c, t) in profiles[v]["kernels"].items() if kernel_class(k) == cls]
            cells.append(f"{sum(t for _, t in ks):.1f} ({sum(c for c, _ in ks):.0f})")
        print(f"| {cls} | " + " | ".join(cells) + " |")
    for key in ("busy_us", "span_us"):
        print(f"| {key} | " + " | ".join(f"{profiles[v][key]:.1f}" for v in names) + " |")
    print("| idle_us | " + " | ".join(f"{profiles[v]['span_us'] - profiles[v]['busy_us']:.1f}" for v in names) + " |")
    print("| replay_ms (timed outside the profiler) | " + " | ".join(f"{profiles[v]['replay_ms']:.3f}" for v in names) + " |")
    if out_dir:
        with open(os.path.join(out_dir, "profile.json"), "w") as f:
            json.dump(profiles, f, indent=1)
    if "bf16" in profiles and "fp8" in profiles:
        b, f8 = profiles["bf16"], profiles["fp8"]
        ROWS.append(("p. bs1 replay busy us (kernel union), FP8", f8["busy_us"], "bf16 busy us", b["busy_us"],
                     b["busy_us"] / f8["busy_us"], f"idle {f8['span_us'] - f8['busy_us']:.1f} vs "
                     f"{b['span_us'] - b['busy_us']:.1f} us; replay {f8['replay_ms']:.3f} vs {b['replay_ms']:.3f} ms"))


def paged_pool(bs, ctx, dtype, device, page=128, heads=8, dim=128):
    pages_per = -(-ctx // page)
    num_slots = (bs * pages_per + 1) * page
    gen = torch.Generator(device).manual_seed(0)
    k = torch.randn(num_slots, heads, dim, device=device, generator=gen)
    v = torch.randn(num_slots, heads, dim, device=device, generator=gen)
    k, v = k.to(dtype), v.to(dtype)
    order = torch.randperm(bs * pages_per, device=device) + 1
    slots = (order.view(bs, pages_per)[:, :, None] * page + torch.arange(page, device=device)).view(bs, -1)[:, :ctx]
    req_to_token = slots.to(torch.int32).contiguous()
    return k, v, req_to_token


KV_TILES = [  # FP8 pool sweep (decode_tiles' own pick first); "tma" left to the launcher unless named.
    # 2026-12-02's sweep of 64/128 keys, 1-3 stages, 4/8 warps found nothing better than the defaults
    # of then; v_split (P.V as even / odd column products on the int16 value pairs, no fp16 V tile
    # stored back to shared memory) made 3 stages pay (2026-12-04: 0.1998 -> 0.1508 ms at bs 64 x 4096)
    None,
    # the kernel before v_split (bs 64 x 4096: 64 keys, 2 stages, gathers; splits: 128 keys, TMA)
    dict(BLOCK_N=64, num_warps=4, num_stages=2, merge="fused", v_split=0, tma=False),
    dict(BLOCK_N=128, num_warps=4, num_stages=2, merge="fused", v_split=0),
    # q.K^T as an FP8 product (2026-12-03: 0.1816 vs 0.1999 ms at bs 64 x 4096), kept as a reference
    dict(BLOCK_N=64, num_warps=4, num_stages=2, merge="fused", q_fp8=True, tma=False),
    dict(BLOCK_N=64, num_warps=4, num_stages=2, merge="fused", v_split=1, tma=False),
    dict(BLOCK_N=64, num_warps=4, num_stages=2, merge="fused", v_split=3, tma=False),
    dict(BLOCK_N=64, num_warps=4, num_stages=3, merge="fused", v_split=3, tma=False),
    dict(BLOCK_N=64, num_warps=4, num_stages=3, merge="fused", v_split=3, tma=True),
    dict(BLOCK_N=128, num_warps=4, num_stages=2, merge="fused", v_split=3),  # the split pick before 2026-12-04
    dict(BLOCK_N=128, num_warps=4, num_stages=3, merge="fused", v_split=3),  # splits only (see below)
    dict(BLOCK_N=128, num_warps=4, num_stages=3, merge="fused", v_split=3, tma=False),
    # the TMA loop's first slots 16 tiles ahead, so that its K / V tiles get num_stages - 1 buffers
    # (tiles["ahead"]; 128 keys, 4 stages is decode_tiles' pick for FP8 split launches since 2026-12-04)
    dict(BLOCK_N=128, num_warps=4, num_stages=3, merge="fused", v_split=3, ahead=16),
    dict(BLOCK_N=128, num_warps=4, num_stages=4, merge="fused", v_split=3, ahead=16),
    dict(BLOCK_N=64, num_warps=4, num_stages=3, merge="fused", v_split=3, tma=True, ahead=16),
]
KV_SPLITS = {64: (2,), 1: (48, 64)}


def graph_ms(calls) -> float:
    """ms per call, the calls captured in one CUDA graph (as decode runs in the runtime): the
    launcher's host time out (eager, the host-bound 1 x 32k launch measured 0.14 ms for 0.04)."""
    return bench_ms(capture_graph(calls).replay) / len(calls)


def bench_kv(args, device, copy_bw):
    from sglite.kernels.decode_attention import decode_attention_fwd
    from sglite.kernels.decode_policy import decode_num_splits
    from sglite.runtime.mem.kv_cache import KVCache
    from sglite.runtime.models.loader import load_config

    cfg = load_config(args.model)
    budget = 40 << 30
    caps = {n: KVCache.for_model(cfg, dtype=d, device="meta", kv_memory_bytes=budget).capacity
            for n, d in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn))}
    ROWS.append(("k. KV pool tokens in 40 GiB, FP8", caps["fp8"], "bf16 tokens", caps["bf16"],
                 caps["fp8"] / caps["bf16"], "KVCache.for_model at the 8B shape"))
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    for bs, ctx in (tuple(map(int, case.split("x"))) for case in args.kv_cases.split(",")):
        # distinct request sets, one launch each, in one graph: a replay reads >= 16x the L2
        sets = min(16, max(2, -(-16 * l2 // (2 * bs * ctx * 8 * 128))))
        splits = decode_num_splits(bs, 8, num_sms=num_sms, max_kv_len=ctx)
        res = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
            k, v, r2t = paged_pool(bs * sets, ctx, dtype, device)
            q = torch.randn(bs * sets, 32, 128, device=device, dtype=torch.bfloat16)
            out = torch.empty_like(q)
            lens = torch.full((bs * sets,), ctx, dtype=torch.int32, device=device)
            read = 2 * bs * ctx * 8 * 128 * k.element_size()

            set_rows = [torch.arange(s * bs, (s + 1) * bs, device=device) for s in range(sets)]

            part = lambda t, s: t[s * bs:(s + 1) * bs]  # noqa: E731  (set s's requests)

            def call(s, tiles, n_split):
                return lambda: decode_attention_fwd(part(q, s), k, v, part(out, s), r2t, set_rows[s], part(lens, s),
                                                    scale=128**-0.5, num_splits=n_split, page_size=128, k_scale=1.0,
                                                    v_scale=1.0, tiles=tiles)

            ref = torch.empty_like(q)
            kb, vb = (k, v) if dtype == torch.bfloat16 else (k.to(torch.bfloat16), v.to(torch.bfloat16))
            for s in range(sets):
                decode_attention_fwd(part(q, s), kb, vb, part(ref, s), r2t, set_rows[s], part(lens, s),
                                     scale=128**-0.5, num_splits=splits, page_size=128)
            del kb, vb
            best = None
            variants = [(t, splits) for t in (KV_TILES if name == "fp8" else [None])]
            if name == "fp8":
                variants += [(t, n) for n in KV_SPLITS.get(bs, ()) for t in (
                    None, dict(BLOCK_N=128 if n > 1 else 64, num_warps=4, num_stages=3, merge="fused", v_split=3))]
            for tiles, n_split in variants:
                if tiles is not None:
                    tiles = dict(tiles)
                    if n_split == 1 and tiles["BLOCK_N"] > 64 and tiles["num_stages"] > 2:
                        continue
                try:
                    out.fill_(float("nan"))
                    t = graph_ms([call(s, tiles, n_split) for s in range(sets)]) * 1e-3
                    err = rel(out, ref)
                except Exception as e:
                    print(f"kv tiles {tiles} splits {n_split} failed: {e!r}"[:300], flush=True)
                    continue
                print(f"decode attn {name} bs{bs} x {ctx} (splits {n_split}, {sets} sets in a graph) tiles {tiles}: "
                      f"{t * 1e3:.4f} ms, {read / t / 1e9:.0f} GB/s read ({read / t / copy_bw:.2f} of copy), "
                      f"err vs bf16(-widened) {err:.1e}", flush=True)
                if best is None or t < best[0]:
                    best = (t, read / t, err, (tiles, n_split))
            res[name] = best
            del k, v, r2t, q, out, ref
            torch.cuda.empty_cache()
        (ft, fbw, ferr, ftiles), (bt, bbw, _, _) = res["fp8"], res["bf16"]
        ROWS.append((f"k. decode attn bs{bs} x {ctx} FP8 read GB/s", fbw / 1e9, "d2d copy GB/s", copy_bw / 1e9,
                     fbw / copy_bw, f"{ft * 1e3:.4f} ms vs bf16 {bt * 1e3:.4f} ms ({bbw / copy_bw:.2f} of copy); "
                     f"CUDA graph of {sets} request sets; (tiles, splits) {ftiles}; err vs bf16-widened pool {ferr:.1e}"))


def bench_server(args, device, quant: str | None, num_requests: int, kv: str = "auto", env: dict | None = None):
    import uuid

    import zmq

    from sglite import protocol
    from sglite.launch import RuntimeProcess, wait_reply

    kw = dict(device=str(device), load_format="dummy", log_interval=5.0)
    if quant:
        kw["quantization"] = quant
    if kv != "auto":
        kw["kv_cache_dtype"] = kv
    with RuntimeProcess(args.model, timeout=600, env=env, **kw) as rt:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(rt.address)
        vocab = rt.info["vocab_size"]

        def run(prompts, max_new) -> int:
            params = dict(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
            for i, ids in enumerate(prompts):
                sock.send(protocol.encode(protocol.GenerateReq(rid=f"b{i}-{uuid.uuid4().hex[:6]}",
                                                               input_ids=ids, sampling_params=params)))
            done = tokens = 0
            while done < len(prompts):
                reply = wait_reply(sock, alive=rt.is_alive, timeout=600, describe=rt.log_tail)
                if isinstance(reply, protocol.ErrorOut):
                    raise RuntimeError(reply.message)
                if reply.finished:
                    done += 1
                    tokens += reply.meta_info["completion_tokens"]
            return tokens

        def info() -> dict:
            sock.send(protocol.encode(protocol.InfoReq(rid=f"i-{uuid.uuid4().hex[:6]}")))
            return wait_reply(sock, alive=rt.is_alive, timeout=60, describe=rt.log_tail).info

        run(torch.randint(0, vocab, (64, args.prompt_len)).tolist(), 16)  # warm-up (compiles)
        prompts = torch.randint(0, vocab, (num_requests, args.prompt_len)).tolist()
        before = info()
        t0 = time.perf_counter()
        tokens = run(prompts, args.output_len)
        elapsed = time.perf_counter() - t0
        after = info()
        cap = rt.info.get("max_total_tokens")
        sock.close()
    # where the time went: the scheduler's own prefill / decode clocks over the timed run
    split = {key: round(after[key] - before[key], 3) for key in
             ("prefill_time_s", "decode_time_s", "num_steps", "num_prefill_tokens", "num_decode_tokens")
             if key in after and key in before}
    print(f"server {quant or 'bf16'} kv {kv} env {env}: {elapsed:.2f} s, {split}, max_running {after.get('max_running_requests')}, "
          f"cuda_graph_max_bs {after.get('cuda_graph_max_bs')}", flush=True)
    return tokens / elapsed, cap


def bench_offline(args, device, t_start):
    # the call has 6 minutes: half the requests when the earlier parts ran long (said in the row)
    n = args.num_requests if time.perf_counter() - t_start < 150 else args.num_requests // 2
    bf16, cap_b = bench_server(args, device, None, n)
    print(f"offline bf16: {bf16:.0f} tok/s (pool {cap_b})", flush=True)
    if not args.offline_skip_fp8_weights:
        fp8, cap_f = bench_server(args, device, "fp8", n)
        print(f"offline fp8: {fp8:.0f} tok/s (pool {cap_f})", flush=True)
        ROWS.append((f"b. offline {n} x ({args.prompt_len} in, {args.output_len} out) tok/s, FP8 weights", fp8,
                     "bf16 tok/s", bf16, fp8 / bf16, f"server defaults; KV pool {cap_f} vs {cap_b} tokens"))
    # what `--quantization fp8 --kv-cache-dtype fp8_e4m3` users run; each --offline-kv-env value
    # (VAR=VALUE[,VAR=VALUE]) one more run with those variables set in the runtime process
    kv_envs = ([None] if args.offline_fp8_kv else []) + [
        dict(item.split("=", 1) for item in spec.split(",")) for spec in args.offline_kv_env]
    for env in kv_envs:
        both, cap_k = bench_server(args, device, "fp8", n, kv="fp8_e4m3", env=env)
        print(f"offline fp8 + fp8 KV (env {env}): {both:.0f} tok/s (pool {cap_k})", flush=True)
        ROWS.append((f"b. offline {n} x ({args.prompt_len} in, {args.output_len} out) tok/s, FP8 weights + FP8 KV"
                     + (f" ({env})" if env else ""), both, "bf16 tok/s", bf16, both / bf16, f"KV pool {cap_k} tokens"))


def run_part(name, fn, *a):
    print(f"--- {name}", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn(*a)
    except Exception:
        traceback.print_exc()
        out = None
    print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print_table()
    return out


def print_table():
    print("| case | fp8 | baseline | baseline value | ratio | note |\n|---|---|---|---|---|---|")
    for case, ours, base_name, base, ratio, note in ROWS:
        print(f"| {case} | {ours:.3f} | {base_name} | {base:.3f} | {ratio:.2f} | {note} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".benchmodel")
    ap.add_argument("--parts", default="g,a,k,b")
    ap.add_argument("--gemm-m", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256, 512, 4096])
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--kv-cases", default="64x4096,1x32768", help="part k: batch x context, comma-separated")
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--offline-fp8-kv", action="store_true", help="part b: also FP8 weights + FP8 KV cache")
    ap.add_argument("--offline-kv-env", action="append", default=[],
                    help="part b: one more FP8 weights + FP8 KV run with VAR=VALUE[,VAR=VALUE] in the runtime's environment")
    ap.add_argument("--offline-skip-fp8-weights", action="store_true", help="part b: no FP8-weights-only run")
    ap.add_argument("--tiles-json", default=None, help='fp8_gemm.TILE_OVERRIDES from a JSON file ("m,n,k" -> '
                    "tiles, bench/fp8_gemv_sweep.py --out-tiles); part a also times the default tiles beside")
    args = ap.parse_args()
    if args.tiles_json and os.path.exists(args.tiles_json):
        with open(args.tiles_json) as f:
            fp8_gemm.TILE_OVERRIDES.update({tuple(map(int, key.split(","))): t for key, t in json.load(f).items()})
        print(f"tile overrides from {args.tiles_json}: {fp8_gemm.TILE_OVERRIDES}", flush=True)
    t_start = time.perf_counter()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    copy_bw = copy_bandwidth(device)
    print(f"card: {card}, torch {torch.__version__}, copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    parts = args.parts.split(",")
    if parts[0] == "b":  # the long part first (a call's time limit then cuts the short ones)
        run_part("b: offline", bench_offline, args, device, t_start)
    if "g" in parts:
        best = run_part("g: linear layers", bench_gemm, args, device) or {}
        fp8_gemm.TILE_OVERRIDES.update({key: t for key, t in best.items() if t is not None})
        print("best tiles:", {str(k): v for k, v in best.items()}, flush=True)
    if "a" in parts:
        run_part("a: batch-1 decode", bench_batch1, args, device, copy_bw)
    if "k" in parts:
        run_part("k: FP8 KV", bench_kv, args, device, copy_bw)
    if "p" in parts:
        run_part("p: batch-1 replay profile", bench_profile, args, device, copy_bw)
    if "s" in parts:
        run_part("s: small layers", bench_small, args, device)
    if "b" in parts[1:]:
        run_part("b: offline", bench_offline, args, device, t_start)
    print(f"\ncard: {card}; d2d copy {copy_bw / 1e9:.0f} GB/s (read + write); total {time.perf_counter() - t_start:.0f} s")
    print_table()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fp8.json"), "w") as f:
            json.dump({"card": card, "rows": ROWS}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
