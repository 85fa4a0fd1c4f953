"""How fast decode attention's split grid can read an FP8 (or bf16) paged pool at all (issue 19).

Decode attention at batch 1 x 32k reads 64 MiB of FP8 K/V (Llama-3-8B shape: 8 KV heads, d 128)
through (split, KV head) programs of a few 128-key TMA tiles each. This times, on the same pool
(pages of 128 slots in random order, as bench/fp8.py part k), request sets captured in one CUDA
graph (a replay reads >= 16x the L2):

- `read`: a kernel with the attention's grid and loads and no attention arithmetic (each
  program TMA-loads its split's K and V tiles by the tiles' first slot ids and sums them as
  int32, one store a program): the ceiling of that access pattern at each split count and depth;
- `read2`: the same with 1, 2 or 4 KV heads' rows a program, TMA or plain loads from each tile's
  first slot, those with the next tile's loads issued before this one's sum (prefetch), and the
  grid ordered head-major (H200 2026-12-04: plain loads one tile ahead 0.86 of copy at 32 splits,
  TMA 0.73; heads a program and grid order within 2%);
- `attn`: decode_attention_fwd itself with the same split counts and tiles;
- the d2d copy (read + write bytes, 1 GiB) as bench/fp8.py's floor.

    python bench/decode_read_ceiling.py                 # H100/H200
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(__file__))
from fp8 import bench_ms, paged_pool  # noqa: E402
from gpu_e2e import capture_graph, copy_bandwidth  # noqa: E402


@triton.jit
def _read_kernel(K, V, K_desc, V_desc, Req_to_token, Rows, Seq_lens, Out, num_splits, num_groups, stride_req,
                  row_words, COLS: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
                  PREFETCH: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Each (split, head group) program reads its split's K and V tiles and sums them as int32 (one
    store a program): COLS words a program (HP heads' rows side by side: 128 B a head in FP8),
    TMA or plain loads (tiles on consecutive slots), the next tile's plain loads issued before
    this one's sum (PREFETCH), and the grid's fastest axis the head group (HEAD_MAJOR) or the split."""
    if HEAD_MAJOR:
        group = tl.program_id(0)
        split = tl.program_id(1)
    else:
        split = tl.program_id(0)
        group = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(Seq_lens + b)
    row = tl.load(Rows + b).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    acc = tl.zeros([BLOCK_N, COLS], tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = group * COLS + tl.arange(0, COLS)
    if USE_TMA:
        for n in range(start, end, BLOCK_N):
            first = tl.load(Req_to_token + row * stride_req + n)
            acc += K_desc.load([first, group * COLS]) ^ V_desc.load([first, group * COLS])
    elif PREFETCH:
        first = tl.load(Req_to_token + row * stride_req + start).to(tl.int64)
        ptr = (first + offs_n)[:, None] * row_words + offs_c[None, :]
        k = tl.load(K + ptr)
        v = tl.load(V + ptr)
        for n in range(start, end, BLOCK_N):
            nxt = tl.minimum(n + BLOCK_N, end - BLOCK_N)  # the last tile loads itself again
            first = tl.load(Req_to_token + row * stride_req + nxt).to(tl.int64)
            ptr = (first + offs_n)[:, None] * row_words + offs_c[None, :]
            k_next = tl.load(K + ptr)
            v_next = tl.load(V + ptr)
            acc += k ^ v
            k = k_next
            v = v_next
    else:
        for n in range(start, end, BLOCK_N):
            first = tl.load(Req_to_token + row * stride_req + n).to(tl.int64)
            ptr = (first + offs_n)[:, None] * row_words + offs_c[None, :]
            acc += tl.load(K + ptr) ^ tl.load(V + ptr)
    pid = (b * num_groups + group) * num_splits + split
    tl.store(Out + pid, tl.sum(tl.sum(acc, 1), 0))


def read_call(k, v, r2t, rows, lens, out, splits, block_n, warps, stages, hp, tma, prefetch, head_major):
    heads = k.shape[1]
    kw, vw = k.view(torch.int32).view(k.shape[0], -1), v.view(torch.int32).view(v.shape[0], -1)
    cols = kw.shape[1] // heads * hp
    kd = TensorDescriptor(kw, list(kw.shape), [kw.shape[1], 1], [block_n, cols])
    vd = TensorDescriptor(vw, list(vw.shape), [vw.shape[1], 1], [block_n, cols])
    groups, bs = heads // hp, rows.numel()
    grid = (groups, splits, bs) if head_major else (splits, groups, bs)

    def call():
        _read_kernel[grid](kw, vw, kd, vd, r2t, rows, lens, out, splits, groups, r2t.stride(0), kw.shape[1],
                            COLS=cols, BLOCK_N=block_n, USE_TMA=tma, PREFETCH=prefetch, HEAD_MAJOR=head_major,
                            num_warps=warps, num_stages=stages)
    return call


# (heads a program, splits, keys a tile, TMA, prefetch, head-major grid, warps)
READ2 = [(hp, sp, bn, tma, pf, hm, w) for hp, sp in ((1, 32), (1, 64), (2, 32), (2, 64), (2, 128), (4, 64), (4, 128))
         for bn, tma, pf, hm, w in ((128, True, False, False, 4), (128, True, False, True, 4),
                                    (128, False, False, False, 4), (128, False, True, False, 4),
                                    (64, False, True, False, 4), (128, False, True, False, 8))]


def main():
    from sglite.kernels.decode_attention import decode_attention_fwd
    from sglite.kernels.decode_policy import decode_num_splits

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x32768")
    ap.add_argument("--dtypes", default="fp8,bf16")
    ap.add_argument("--splits", default="24,32,48,64")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--attn-tiles", default="128:2,128:3,64:2,64:3",
                    help="keys:stages[:warps[:ahead[:merge]]] tiles for the attention kernel (4 warps unless "
                         "named; ahead: tiles['ahead']; merge: fused or kernel), beside decode_tiles' pick")
    ap.add_argument("--read-keys", default="128,64", help="the read kernel's tile keys")
    ap.add_argument("--read2", default="all", choices=("all", "prefetch", "none"),
                    help="read2 variants: all, only one head a program with plain loads one tile ahead at "
                         "--splits (prefetch), or none")
    ap.add_argument("--read-only", action="store_true", help="the read kernels only (no attention)")
    ap.add_argument("--no-read", dest="read", action="store_false", help="the attention kernel only")
    args = ap.parse_args()
    device = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = copy_bandwidth(device)
    print(f"d2d copy (1 GiB, read + write): {copy_bw / 1e9:.0f} GB/s")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows_out = []
    for bs, ctx in (tuple(map(int, c.split("x"))) for c in args.cases.split(",")):
        sets = min(16, max(2, -(-16 * l2 // (2 * bs * ctx * 8 * 128))))
        default_splits = decode_num_splits(bs, 8, num_sms=num_sms, max_kv_len=ctx)
        for name in args.dtypes.split(","):
            dtype = torch.float8_e4m3fn if name == "fp8" else torch.bfloat16
            k, v, r2t = paged_pool(bs * sets, ctx, dtype, device)
            read = 2 * bs * ctx * 8 * 128 * k.element_size()
            lens = torch.full((bs * sets,), ctx, dtype=torch.int32, device=device)
            set_rows = [torch.arange(s * bs, (s + 1) * bs, device=device) for s in range(sets)]
            q = torch.randn(bs * sets, 32, 128, device=device, dtype=torch.bfloat16)
            out = torch.empty_like(q)
            sums = torch.zeros(bs * 8 * 128, dtype=torch.int32, device=device)

            def report(kind, desc, calls):
                try:
                    t = bench_ms(capture_graph(calls).replay) / len(calls) * 1e-3
                except Exception as e:  # a tile the compiler or the card refuses
                    print(f"{name} bs{bs} x {ctx} {kind} {desc}: failed {e!r}"[:300], flush=True)
                    return
                line = (f"| {name} | {bs} x {ctx} | {kind} | {desc} | {t * 1e6:.1f} | {read / t / 1e9:.0f} | "
                        f"{read / t / copy_bw:.2f} |")
                print(line, flush=True)
                rows_out.append(line)

            for splits, stages, block_n in itertools.product(map(int, args.splits.split(",")) if args.read else (),
                                                             map(int, args.stages.split(",")),
                                                             map(int, args.read_keys.split(","))):
                calls = [read_call(k, v, r2t, set_rows[s], lens[s * bs:(s + 1) * bs], sums, splits, block_n, 4,
                                    stages, 1, True, False, False) for s in range(sets)]
                report("read", f"splits {splits}, {block_n} keys, {stages} stages", calls)
            read2 = READ2 if args.read2 == "all" else [
                (1, sp, 128, False, True, False, 4) for sp in map(int, args.splits.split(","))
            ] if args.read2 == "prefetch" else []
            for hp, splits, block_n, tma, prefetch, head_major, warps in read2 if args.read else ():
                calls = [read_call(k, v, r2t, set_rows[s], lens[s * bs:(s + 1) * bs], sums, splits, block_n, warps,
                                    2, hp, tma, prefetch, head_major) for s in range(sets)]
                report("read2", f"{hp} heads a program, splits {splits}, {block_n} keys, {warps} warps, "
                       f"{'TMA' if tma else 'loads'}{', prefetch' if prefetch else ''}"
                       f"{', head-major' if head_major else ''}", calls)
            if args.read_only:
                continue
            ref = None
            split_counts = {default_splits, *map(int, args.splits.split(","))} if bs == 1 else {default_splits}
            for splits in sorted(split_counts):
                for spec in [None] + args.attn_tiles.split(","):  # None: decode_tiles' pick
                    tiles = None
                    if spec is not None:  # keys:stages[:warps[:ahead[:merge]]]
                        block_n, stages, warps, ahead, merge = (spec.split(":") + ["4", "0", "fused"][
                            spec.count(":") - 1:])[:5]
                        tiles = dict(BLOCK_N=int(block_n), num_warps=int(warps), num_stages=int(stages),
                                     merge=merge, ahead=int(ahead))

                    def attn(s, tiles=tiles, splits=splits):
                        return lambda: decode_attention_fwd(
                            q[s * bs:(s + 1) * bs], k, v, out[s * bs:(s + 1) * bs], r2t, set_rows[s],
                            lens[s * bs:(s + 1) * bs], scale=128**-0.5, num_splits=splits, page_size=128,
                            tiles=None if tiles is None else dict(tiles))
                    mark = " (decode_num_splits)" if splits == default_splits else ""
                    desc = "decode_tiles" if tiles is None else (
                        f"{tiles['BLOCK_N']} keys, {tiles['num_stages']} stages, {tiles['num_warps']} warps"
                        f"{', first slots %d ahead' % tiles['ahead'] if tiles['ahead'] else ''}"
                        f"{', merge kernel' if tiles['merge'] == 'kernel' else ''}")
                    out.fill_(float("nan"))
                    report("attn", f"splits {splits}{mark}, {desc}", [attn(s) for s in range(sets)])
                    if ref is None:
                        ref = out.clone()
                    elif (err := ((out.float() - ref.float()).norm() / ref.float().norm()).item()) > 1e-2:
                        print(f"  ^ output differs from the first variant's: rel err {err:.1e}", flush=True)
            del k, v, r2t
            torch.cuda.empty_cache()
    print(f"\ncopy {copy_bw / 1e9:.0f} GB/s; graphs of {sets} request sets\n")
    print("| pool | case | kernel | tiles | us a call | GB/s read | of copy |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))


if __name__ == "__main__":
    main()
