"""Batch-1 FP8 linears at the Llama-3-8B shape (issue 19): fp8_gemv.py's one-row kernel variants
beside fp8_gemm's default one-row tiles and cuBLAS bf16, each checked against a float64 reference
before it is timed (H200 results: docs/benchmarks.md, issue 19 sixth session; the default tiles
were the old one-row loop then, removed since).

Per shape (qkv, o, gate_up, down) and variant: 32 layers' worth of distinct weights (one model's
bytes: past L2) run back to back in one CUDA graph, as the decode graph runs them; ms per
linear and GB/s of weights read. Then the 128 decoder linears of 32 layers in model order in one
graph: bf16 (F.linear), the current default tiles, and the best variant per shape. The best tiles
go to --out-tiles (JSON: "m,n,k" -> tiles), which bench/fp8.py --tiles-json reads (part a then
times the whole decode step with them, bf16 beside).

    python bench/fp8_gemv_sweep.py [--out-tiles /tmp/fp8_tiles.json] [--layers 32]
    python bench/fp8_gemv_sweep.py --compile-only      # no GPU: sm90 registers / spills per variant
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from sglite.kernels import fp8_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
_V = lambda bn, bk, vec, w, st=1, **kw: dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, VEC=vec, num_warps=w,  # noqa: E731
                                             num_stages=1, STAGES=st, **kw)
VARIANTS = [  # VEC 8 (16-byte weight runs put x through a layout conversion: triton 3.6 SASS); one
    # thread per 8-wide K group (BLOCK_K / 8 threads: more put threads along N and convert x too)
    _V(8, 1024, 8, 4), _V(16, 1024, 8, 4), _V(4, 1024, 8, 4), _V(8, 2048, 8, 8), _V(16, 2048, 8, 8),
    _V(4, 2048, 8, 8), _V(8, 512, 8, 2), _V(16, 512, 8, 2),
    _V(8, 1024, 8, 4, 2), _V(8, 1024, 8, 4, 3), _V(16, 1024, 8, 4, 2), _V(8, 2048, 8, 8, 2),
    _V(8, 1024, 8, 4, PDL=True), _V(16, 1024, 8, 4, PDL=True), _V(8, 2048, 8, 8, PDL=True),
    _V(8, 1024, 8, 4, 2, PDL=True), _V(8, 1024, 8, 4, PREFETCH=True),
    _V(8, 1024, 8, 4, PERSIST=4), _V(8, 1024, 8, 4, PERSIST=6), _V(16, 1024, 8, 4, PERSIST=3),
    _V(8, 2048, 8, 8, PERSIST=3),
]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def graph_ms(calls) -> float:
    """ms per replay of one CUDA graph holding the calls (median of do_bench)."""
    import triton.testing

    from gpu_e2e import capture_graph

    return triton.testing.do_bench(capture_graph(calls).replay, warmup=20, rep=100, return_mode="median")


def check(tiles, n, k, device) -> float:
    """Relative error vs float64 on fresh random data, the output poisoned first (NaN fails)."""
    from sglite.runtime.models.quant.fp8 import quantize_per_channel

    w, s = quantize_per_channel(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    ref = x.double() @ (w.double() * s.double()[:, None]).T
    out = fp8_gemm.w8a16_matmul(x, w, s, tiles=tiles)
    return rel(out, ref) if not out.isnan().any() else float("nan")


def sweep(args, device):
    from sglite.runtime.models.quant.fp8 import quantize_per_channel

    results, layers = {}, {}
    for name, (n, k) in SHAPES.items():
        ws = []
        for _ in range(args.layers):
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            ws.append((w, *quantize_per_channel(w)))
        layers[name] = ws
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        gbytes = args.layers * n * k / 1e9
        t = graph_ms([lambda w=w: F.linear(x, w) for w, _, _ in ws]) / args.layers
        rows = [("bf16 F.linear", t, 2 * gbytes / args.layers / t * 1e3, 0.0)]
        default = fp8_gemm.fp8_gemm_tiles(1, n, k, device=device)
        for tiles in [default] + VARIANTS:
            try:
                err = check(tiles, n, k, device)
                if not err < 5e-3:  # bf16 output rounding ~1e-3 (truncation on the interpreter: ~3e-3)
                    print(f"{name} {tiles}: WRONG, rel err {err}", flush=True)
                    continue
                t = graph_ms([lambda wq=wq, s=s: fp8_gemm.w8a16_matmul(x, wq, s, tiles=tiles) for _, wq, s in ws])
                t /= args.layers
            except Exception as e:  # a variant that does not compile or launch here
                print(f"{name} {tiles}: failed {e!r}"[:300], flush=True)
                continue
            rows.append((json.dumps(tiles) + (" (default)" if tiles is default else ""), t,
                         gbytes / args.layers / t * 1e3, err))
        for label, t, gbs, err in rows:
            print(f"{name} {n}x{k}: {t * 1e3:8.2f} us {gbs:6.0f} GB/s err {err:.1e}  {label}", flush=True)
        fp8_rows = [r for r in rows[1:]]
        results[name] = dict(bf16=rows[0][1], default=rows[1][1] if len(rows) > 1 else None,
                             best=min(fp8_rows, key=lambda r: r[1]) if fp8_rows else None)
    return results, layers


def whole(args, device, results, layers, copy_bw):
    """The 128 linears in model order in one graph: bf16, default tiles, the best per shape."""
    xs = {k: torch.randn(1, k, device=device, dtype=torch.bfloat16) for _, k in SHAPES.values()}
    best = {name: json.loads(r["best"][0].replace(" (default)", "")) for name, r in results.items() if r["best"]}
    order = [(name, i) for i in range(args.layers) for name in SHAPES]

    def calls(kind):
        out = []
        for name, i in order:
            w, wq, s = layers[name][i]
            x = xs[SHAPES[name][1]]
            if kind == "bf16":
                out.append(lambda x=x, w=w: F.linear(x, w))
            else:
                tiles = best.get(name) if kind == "best" else None
                out.append(lambda x=x, wq=wq, s=s, t=tiles: fp8_gemm.w8a16_matmul(x, wq, s, tiles=t))
        return out

    fp8_bytes = sum(n * k for n, k in SHAPES.values()) * args.layers
    table = {}
    for kind in ("bf16", "default", "best", "bf16 again", "default again", "best again"):
        t = graph_ms(calls(kind.split()[0]))
        nbytes = fp8_bytes * (2 if kind.startswith("bf16") else 1)
        table[kind] = t
        print(f"whole {len(order)} linears {kind}: {t:.3f} ms, {nbytes / t / 1e6:.0f} GB/s "
              f"({nbytes / t / 1e6 / (copy_bw / 1e9):.2f} of copy)", flush=True)
    return best, table


def copy_gbs(device) -> float:
    import triton.testing

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median")
    return 2 * a.numel() / (t * 1e-3)


def compile_only():
    """sm90 registers / spills of each variant at each shape, without a GPU (fp8_compile_check)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import fp8_compile_check as cc
    from triton.runtime.jit import JITFunction

    JITFunction.run = cc._record
    for tiles in VARIANTS:
        for n, k in ((6144, 4096), (4096, 14336)):
            fp8_gemm.w8a16_matmul(torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(n, k).to(torch.float8_e4m3fn),
                                  torch.ones(n), tiles=tiles)
        cc.compile_recorded(json.dumps({k: v for k, v in tiles.items() if k != "BLOCK_M"})[:40])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out-tiles", default=None)
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    if args.compile_only:
        return compile_only()
    device = torch.device("cuda")
    copy_bw = copy_gbs(device)
    print(f"card {torch.cuda.get_device_name(device)}, copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    results, layers = sweep(args, device)
    best, table = whole(args, device, results, layers, copy_bw)
    print("best per shape:", json.dumps(best), flush=True)
    if args.out_tiles:
        tiles = {f"1,{n},{k}": best[name] for name, (n, k) in SHAPES.items() if name in best}
        with open(args.out_tiles, "w") as f:
            json.dump(tiles, f)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gemv_sweep.json"), "w") as f:
            json.dump(dict(results={k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
                           best=best, whole=table, copy=copy_bw), f, indent=1, default=str)


if __name__ == "__main__":
    main()
