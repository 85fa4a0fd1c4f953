"""GPU benchmark of the attention kernels, with their baselines timed in the same run.

    python bench/kernels.py [--sweep [all|decode|decode1|extend]]

Prints the card, then one row per case: time, the rate (GB/s of K+V read for decode, TFLOP/s for
extend), the baseline (device-to-device copy bandwidth; torch SDPA on the same KV laid out
densely) and the ratio, plus ||out - ref|| / ||ref|| against the fp32 torch reference.
Decode rows also time the old version beside (stage-2 merge kernel, 64-key tiles, old split policy).
--sweep also times a few tile configurations and split counts (for the tile tables).
Shapes: Llama-3-8B attention (32 query heads, 8 KV heads, d=128), bf16. Decode KV layouts: pages of
128 slots in random order (the GPU server's paged pool), every token on a random slot (a pool of
page_size 1), one consecutive run per request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglite.kernels.decode_attention import decode_attention_fwd  # noqa: E402
from sglite.kernels.decode_policy import decode_num_splits, decode_tiles  # noqa: E402
from sglite.kernels.extend_attention import extend_attention_fwd  # noqa: E402
from sglite.kernels.reference import decode_attention_ref, extend_attention_ref  # noqa: E402
from sglite.kernels.store_kv import store_kv  # noqa: E402

H, KH, D, DTYPE = 32, 8, 128, torch.bfloat16
DEV = torch.device("cuda")
ROWS: list[tuple] = []


def bench(fn) -> float:
    """Median milliseconds over ~200 ms of repeats (events; L2 flushed between repeats)."""
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def row(case, ms, rate, unit, base_name, base_rate, err=None):
    ROWS.append((case, ms, rate, unit, base_name, base_rate, rate / base_rate if base_rate else None, err))
    print(f"  {case}: {ms:.3f} ms {rate:.1f} {unit} vs {base_name} {base_rate:.1f} -> {rate / base_rate:.2f}"
          + (f" err {err:.1e}" if err is not None else ""), flush=True)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 29, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


PAGE = 128  # the GPU server's default page_size


def make_pool(seq_lens: list[int], *, new_tokens: list[int] | None = None, seed=0, layout="random"):
    """Requests over the pool: every token on a random slot ("random", a page_size 1 pool after
    churn), pages of PAGE slots in random order ("pages", the paged pool after churn), or one
    run ("consecutive"); returns buffers, req_to_token and the new tokens' slots."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    total = sum(seq_lens)
    num_slots = (sum(triton.cdiv(n, PAGE) for n in seq_lens) + 1) * PAGE if layout == "pages" else total + 1
    k_buf = torch.randn(num_slots, KH, D, device=DEV, dtype=DTYPE, generator=gen)
    v_buf = torch.randn(num_slots, KH, D, device=DEV, dtype=DTYPE, generator=gen)
    if layout == "pages":  # page 0 holds the padding slot
        pages = torch.randperm(num_slots // PAGE - 1, device=DEV, generator=gen) + 1
    else:
        slots = torch.arange(total, device=DEV) if layout == "consecutive" else torch.randperm(
            total, device=DEV, generator=gen)
        slots = slots.int() + 1
    req_to_token = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32, device=DEV)
    start, first_page, locs = 0, 0, []
    for i, n in enumerate(seq_lens):
        if layout == "pages":
            own = pages[first_page : first_page + triton.cdiv(n, PAGE)]
            first_page += len(own)
            req_to_token[i, :n] = (own[:, None] * PAGE + torch.arange(PAGE, device=DEV)).flatten()[:n].int()
        else:
            req_to_token[i, :n] = slots[start : start + n]
        if new_tokens is not None:
            locs.append(req_to_token[i, n - new_tokens[i] : n].long())
        start += n
    return k_buf, v_buf, req_to_token, (torch.cat(locs) if locs else None)


def dense_kv(k_buf, v_buf, req_to_token, seq_len):
    """[bs, KH, seq_len, D]: the same KV laid out densely for SDPA."""
    idx = req_to_token[:, :seq_len].long()
    return k_buf[idx].transpose(1, 2).contiguous(), v_buf[idx].transpose(1, 2).contiguous()


def graph_ms(calls) -> float:
    """Milliseconds per call, the calls captured in one CUDA graph (as decode runs in the
    runtime): launch overhead out, only device time in."""
    from gpu_e2e import capture_graph  # bench/ is on sys.path when a script of it runs

    return bench(capture_graph(calls).replay) / len(calls)


def bench_decode(bs, seq_len, copy_bw, *, window=None, num_global=0, sdpa=True, sweep=False, layout="random"):
    read_len = seq_len if window is None else min(seq_len, window + num_global)
    kv_bytes = 2 * bs * read_len * KH * D * 2
    # distinct request sets, one launch each, in one graph: a replay reads >= 32x the L2 (no cache
    # hits), so the graph's own launch is spread thin and each kernel follows another, as the
    # 32 layers' attention kernels do in a decode step (with 2 sets, half a graph launch landed on
    # each kernel: H200 bs 1 x 32k, ours 45.6 vs 40.7 us at 16 sets, SDPA 44.3 vs 38.5)
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    copies = min(16, max(2, triton.cdiv(32 * l2, kv_bytes)))
    k_buf, v_buf, r2t, _ = make_pool([seq_len] * (bs * copies), layout=layout)
    page_size = PAGE if layout == "pages" else 1  # what the runtime's backend passes
    q = torch.randn(bs * copies, H, D, device=DEV, dtype=DTYPE)
    out = torch.empty_like(q)
    rows = torch.arange(bs * copies, device=DEV)
    lens = torch.full((bs * copies,), seq_len, dtype=torch.int32, device=DEV)
    num_sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    splits = decode_num_splits(bs, KH, num_sms=num_sms, max_kv_len=read_len)  # as the backend does
    part = [slice(i * bs, (i + 1) * bs) for i in range(copies)]

    def calls(num_splits=splits, tiles=None):
        mid_o = torch.empty(bs, H, num_splits, D, device=DEV, dtype=torch.float32)
        mid_lse = torch.empty(bs, H, num_splits, device=DEV, dtype=torch.float32)
        return [lambda p=p: decode_attention_fwd(
            q[p], k_buf, v_buf, out[p], r2t, rows[p], lens[p], scale=D**-0.5, num_splits=num_splits,
            sliding_window=window, global_tokens=num_global, mid_o=mid_o, mid_lse=mid_lse, tiles=tiles,
            page_size=page_size) for p in part]

    eager = calls()[0]
    eager()
    ref = decode_attention_ref(q[:bs], k_buf, v_buf, r2t, list(range(bs)), [seq_len] * bs, scale=D**-0.5,
                               sliding_window=window, global_tokens=num_global)
    err = rel_err(out[:bs], ref)
    name = (f"decode bs={bs} ctx={seq_len}" + (f" W={window} G={num_global}" if window else "")
            + f" splits={splits}" + {"random": " random slots", "pages": f" pages of {PAGE}",
                                     "consecutive": " consecutive slots"}[layout])
    ms = graph_ms(calls())
    print(f"  {name}: eager (launch-bound) {bench(eager):.3f} ms, graph {ms:.3f} ms, x{copies} sets", flush=True)
    row(name + " vs copy", ms, kv_bytes / ms / 1e6, "GB/s", "d2d copy", copy_bw, err)
    if layout == "pages":  # the same kernel gathering every tile row by row (before the paged pool)
        ms_gather = graph_ms(calls(splits, {**decode_tiles(D, device=DEV, num_splits=splits), "tma": False}))
        row(name + " vs gathers", ms, kv_bytes / ms / 1e6, "GB/s", "gathers", kv_bytes / ms_gather / 1e6)
    # the version before issue 6's merge work, timed here beside the current one
    ms_old = graph_ms(calls(old_splits(bs, read_len, num_sms), OLD_TILES))
    row(name + " vs old (2 kernels)", ms, kv_bytes / ms / 1e6, "GB/s", "old", kv_bytes / ms_old / 1e6)
    if sdpa:
        kd, vd = dense_kv(k_buf, v_buf, r2t, seq_len)
        q4 = q.unsqueeze(2)
        ms_sdpa = graph_ms([lambda p=p: F.scaled_dot_product_attention(q4[p], kd[p], vd[p], enable_gqa=True)
                            for p in part])
        row(name + " vs SDPA", ms, kv_bytes / ms / 1e6, "GB/s", "SDPA dense", kv_bytes / ms_sdpa / 1e6)
        del kd, vd
    if sweep:  # each config twice over the merges; the old default (64, 4, 2, "kernel") is in the set
        more = {16, 32, 48} if bs == 1 and window is None else set()
        for bn, warps, stages in SWEEP_DECODE:
            for s in sorted({max(1, splits // 2), splits} | more):
                for merge in ("fused", "kernel"):
                    tiles = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages, merge=merge)
                    out.fill_(float("nan"))
                    try:
                        t = graph_ms(calls(s, tiles))
                    except Exception as exc:  # out of shared memory etc.: report and go on
                        print(f"    sweep decode bs={bs} {tiles} splits={s}: failed {type(exc).__name__}")
                        continue
                    print(f"    sweep decode bs={bs} read={read_len} BN={bn} w={warps} st={stages} splits={s} "
                          f"{merge}: {t:.4f} ms {kv_bytes / t / 1e6:.0f} GB/s err {rel_err(out[:bs], ref):.1e}",
                          flush=True)
    return ms


OLD_TILES = dict(BLOCK_N=64, num_warps=4, num_stages=2, merge="kernel", tma=False)  # before the fused merge


def old_splits(bs, kv_len, num_sms):
    """decode_num_splits as it was before the fused merge: ~4 programs per SM, <= 64, >= 128 keys each."""
    if bs * KH >= 2 * num_sms:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, bs * KH), triton.cdiv(kv_len, 128), 64))


# earlier sweeps (H200): 8 warps and 32-key tiles always lost at d=128, so only these remain
SWEEP_DECODE = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3)]


def flash_baseline(q, k, v, scale):
    """torch's flash kernel, causal aligned bottom-right (what a cached prefix needs)."""
    def call(kk, vv):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, kk, vv, 0.0, True, False, scale=scale)[0]

    try:
        call(k, v)
        return lambda: call(k, v), "SDPA flash (GQA)"
    except RuntimeError:
        ke, ve = k.repeat_interleave(H // KH, 1), v.repeat_interleave(H // KH, 1)
        return lambda: call(ke, ve), "SDPA flash (KV expanded)"


def bench_extend(bs, new_len, prefix_len, *, sweep=False):
    seq_len = prefix_len + new_len
    k_buf, v_buf, r2t, loc = make_pool([seq_len] * bs, new_tokens=[new_len] * bs, seed=1)
    q = torch.randn(bs * new_len, H, D, device=DEV, dtype=DTYPE)
    k_new, v_new = k_buf[loc], v_buf[loc]
    out = torch.empty_like(q)
    i32 = dict(dtype=torch.int32, device=DEV)
    args = (torch.arange(bs, device=DEV), torch.full((bs,), prefix_len, **i32), torch.full((bs,), new_len, **i32),
            torch.arange(0, bs * new_len, new_len, **i32))

    def run(tiles=None):
        return extend_attention_fwd(q, k_new, v_new, out, k_buf, v_buf, r2t, *args, max_extend_len=new_len,
                                    scale=D**-0.5, out_cache_loc=loc, tiles=tiles)

    run()
    ref = torch.cat([
        extend_attention_ref(q[i * new_len : (i + 1) * new_len], k_buf, v_buf, r2t, [i], [prefix_len], [new_len],
                             scale=D**-0.5) for i in range(bs)])
    err = rel_err(out, ref)
    del ref
    flops = 4 * D * H * bs * (new_len * prefix_len + new_len * (new_len + 1) / 2)
    ms = bench(run)
    kd, vd = dense_kv(k_buf, v_buf, r2t, seq_len)
    q4 = q.view(bs, new_len, H, D).transpose(1, 2).contiguous()
    base, base_name = flash_baseline(q4, kd, vd, D**-0.5)
    ms_base = bench(base)
    name = f"extend bs={bs} new={new_len} cached={prefix_len}"
    row(name, ms, flops / ms / 1e9, "TFLOP/s", base_name, flops / ms_base / 1e9, err)
    if sweep:
        for rows_, bn, warps, stages in [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4),
                                         (128, 128, 4, 2), (256, 64, 8, 2), (256, 64, 8, 3), (64, 64, 4, 3)]:
            tiles = dict(BLOCK_M=rows_ // 4, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            try:
                t = bench(lambda: run(tiles))
                print(f"    sweep extend cached={prefix_len} rows={rows_} BN={bn} w={warps} st={stages}: "
                      f"{t:.3f} ms {flops / t / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as exc:  # out of shared memory etc.: report and go on
                print(f"    sweep extend rows={rows_} BN={bn} w={warps} st={stages}: failed {type(exc).__name__}")


def bench_store(num_tokens):
    k_buf, v_buf, _, _ = make_pool([num_tokens * 4])
    loc = torch.randperm(num_tokens * 4, device=DEV)[:num_tokens] + 1
    k = torch.randn(num_tokens, KH, D, device=DEV, dtype=DTYPE)
    v = torch.randn_like(k)
    nbytes = 2 * 2 * k.numel() * k.element_size()  # read + write, K and V
    ours = lambda: store_kv(k_buf, v_buf, loc, k, v)  # noqa: E731
    base = lambda: (k_buf.index_copy_(0, loc, k), v_buf.index_copy_(0, loc, v))  # noqa: E731
    for how, timer in (("eager", lambda fn: bench(fn)), ("graph", lambda fn: graph_ms([fn]))):
        ms, ms_base = timer(ours), timer(base)
        row(f"store_kv tokens={num_tokens} {how}", ms, nbytes / ms / 1e6, "GB/s", "index_copy_",
            nbytes / ms_base / 1e6)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", nargs="?", const="all", choices=("all", "decode", "decode1", "extend"),
                        help="also time alternative tiles and split counts (decode1: decode at batch 1 only)")
    sweep = parser.parse_args().sweep or ""
    props = torch.cuda.get_device_properties(DEV)
    print(f"card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    copy_bw = copy_bandwidth()
    print(f"  d2d copy: {copy_bw:.0f} GB/s (read + write)", flush=True)
    # every token on a random slot (--page-size 1), then the GPU server's paged pool (pages in random order)
    for layout in ("random", "pages"):
        bench_decode(64, 4096, copy_bw, sweep=sweep in ("all", "decode"), layout=layout)
        full = bench_decode(1, 32768, copy_bw, sweep=sweep in ("all", "decode", "decode1"), layout=layout)
    win = bench_decode(1, 32768, copy_bw, window=4096, num_global=4, sdpa=False,
                       sweep=sweep in ("all", "decode", "decode1"), layout="pages")
    for bs, seq_len in ((64, 4096), (1, 32768)):  # one run per request
        bench_decode(bs, seq_len, copy_bw, sdpa=False, layout="consecutive")
    ROWS.append(("decode bs=1 ctx=32768 pages: W=4096 vs full (speed-up)", win, 1 / win, "1/ms", "full", 1 / full,
                 full / win, None))
    bench_extend(4, 2048, 0, sweep=sweep in ("all", "extend"))
    bench_extend(4, 2048, 2048, sweep=sweep in ("all", "extend"))
    bench_store(64)
    bench_store(8192)
    print(f"\n{props.name} | case | ms | rate | baseline | ratio | rel err")
    for case, ms, rate, unit, base_name, base_rate, ratio, err in ROWS:
        err_s = f"{err:.1e}" if err is not None else "-"
        print(f"| {case} | {ms:.3f} | {rate:.1f} {unit} | {base_name} {base_rate:.1f} | {ratio:.2f} | {err_s} |")


if __name__ == "__main__":
    main()
