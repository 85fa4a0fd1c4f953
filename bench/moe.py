"""Mixture of experts on the GPU (issue 18), baselines in the same run, at Qwen3-30B-A3B's shape
(48 layers, hidden 2048, 128 experts of 768, top-8, GQA 32/4 x 128, vocab 151936; ~61 GB bf16):

k. the fused-MoE kernel (sglite.kernels.fused_moe) vs its torch reference (transformers' per-expert
   loop) at 1, 64 and 4096 tokens: median time, the weight-bytes floor, and the relative error of
   both against an fp32 reference on the same (upcast) inputs;
d. decode tokens/s at batch 64 and 256 through sglite's Scheduler (CUDA graphs, overlapped loop;
   random weights from a config-only folder, load_format="dummy") vs transformers `generate` at
   the same batch (random weights, same shape), as shipped and with grouped_mm kept for its
   decode steps: the per-step time from a clock in generate's loop (bench/moe_hf.py).

Each part runs in its own process (two copies of the model do not fit one card); results are
JSON lines under --out and a table at the end.

    python bench/moe.py --out $OUT                     # H200
    python bench/moe.py --out /tmp/moe --tiny          # CPU smoke test (interpreter, 2 layers)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645,
    hidden_act="silu", attention_bias=False, use_sliding_window=False,
)
TINY = dict(QWEN3_30B_A3B, vocab_size=512, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=1024)


def emit(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(out / "moe_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- k. the kernel -----------------------------------------------------------------------------
def part_kernel(args, out: Path, shape: dict):
    import torch

    from sglite.kernels.fused_moe import fused_moe, fused_moe_reference, moe_config
    from sglite.runtime.models.layers.moe import select_experts

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    E, H, inter, k = (shape["num_experts"], shape["hidden_size"], shape["moe_intermediate_size"],
                      shape["num_experts_per_tok"])
    gen = torch.Generator(dev).manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, H, device=dev, generator=gen) * 0.02).to(dtype)
    w2 = (torch.randn(E, H, inter, device=dev, generator=gen) * 0.02).to(dtype)
    bw = copy_bandwidth() if cuda else float("nan")
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    for num_tokens in args.kernel_tokens:
        x = torch.randn(num_tokens, H, device=dev, generator=gen).to(dtype)
        logits = torch.randn(num_tokens, E, device=dev, generator=gen)
        weights, ids = select_experts(logits, k, renormalize=True)
        weights = weights.to(dtype)
        ref32 = fused_moe_reference(x.float(), w13.float(), w2.float(), weights.float(), ids)
        got = fused_moe(x, w13, w2, weights, ids)
        ref = fused_moe_reference(x, w13, w2, weights, ids)
        err = lambda y: ((y.float() - ref32).norm() / ref32.norm()).item()  # noqa: E731
        t_kernel = bench_ms(lambda: fused_moe(x, w13, w2, weights, ids))
        t_ref = bench_ms(lambda: fused_moe_reference(x, w13, w2, weights, ids))
        num_hit = int(torch.unique(ids).numel())
        floor_ms = num_hit * expert_bytes / bw * 1e3
        row = dict(part="kernel", tokens=num_tokens, kernel_ms=t_kernel, ref_ms=t_ref,
                   speedup=t_ref / t_kernel, kernel_rel_err=err(got), ref_rel_err=err(ref),
                   experts_hit=num_hit, floor_ms=floor_ms, copy_gbs=bw / 1e9,
                   nan=bool(torch.isnan(got).any()), config=moe_config(num_tokens, is_cuda=cuda))
        emit(out, row)
        if cuda and args.sweep and num_tokens > 1:  # alternatives to the default tiles
            sweep = {}
            for cfg in SWEEP:
                try:
                    sweep[json.dumps(cfg)] = bench_ms(
                        lambda: fused_moe(x, w13, w2, weights, ids, config=cfg))
                except Exception as e:  # noqa: BLE001 (a tile that does not fit: record it)
                    sweep[json.dumps(cfg)] = repr(e)[:80]
            emit(out, dict(part="sweep", tokens=num_tokens, sweep=sweep))
        del ref32
    if cuda:
        align_rows(out, shape)


def align_rows(out: Path, shape: dict, layers: int = 48):
    """The align step alone, one call per layer in a CUDA graph (as a captured decode step runs
    it): the one-launch kernel vs the torch ops, at decode batch sizes."""
    import torch

    from sglite.kernels import fused_moe as fm
    from sglite.runtime.models.layers.moe import select_experts

    for num_tokens in (1, 64, 256):
        logits = torch.randn(layers, num_tokens, shape["num_experts"], device="cuda")
        ids = [select_experts(lg, shape["num_experts_per_tok"], renormalize=True)[1] for lg in logits]
        block_m = fm.moe_config(num_tokens, is_cuda=True)["BLOCK_M"]
        row = dict(part="align", tokens=num_tokens, layers=layers)
        for name, fn in (("kernel", fm.moe_align_block_size), ("torch", fm.moe_align_block_size_torch)):
            got = [fn(i, block_m, shape["num_experts"]) for i in ids]  # warm-up, compile
            ref = fm.moe_align_block_size_torch(ids[0], block_m, shape["num_experts"])
            row[f"{name}_equal"] = all(torch.equal(a, b) for a, b in zip(got[0], ref))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in ids:
                    fn(i, block_m, shape["num_experts"])
            graph.replay()
            sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            sync()
            row[f"{name}_us"] = start.elapsed_time(end) * 1e3 / (10 * layers)
        emit(out, row)


SWEEP = [
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
]


def bench_ms(fn) -> float:
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    import torch

    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms / 1e3)


# --- d. decode through sglite ---------------------------------------------------------------------
class _Sink:
    def on_output(self, req, text, finished, meta):
        pass

    def on_error(self, req, message):
        raise RuntimeError(message)


def part_sglite(args, out: Path, folder: str):
    import torch

    from sglite.runtime.executor.model_runner import ModelRunner

    cuda = torch.cuda.is_available()
    max_bs = max(args.batches)
    t0 = time.perf_counter()
    runner = ModelRunner(folder, load_format="dummy", skip_tokenizer_init=True,
                         device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                         max_total_tokens=max_bs * (args.prompt_len + args.decode_steps + 64),
                         max_running_requests=max_bs, cuda_graph_max_bs=max_bs)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    emit(out, dict(part="sglite_load", seconds=time.perf_counter() - t0, weight_gb=weight_bytes / 1e9,
                   copy_gbs=copy_bandwidth() / 1e9 if cuda else float("nan")))
    vocab = runner.model_config.vocab_size
    for bs in args.batches:
        decode_at(args, out, runner, bs, vocab, "sglite_decode")
        if args.profile and cuda and bs == args.batches[0]:
            decode_at(args, out, runner, bs, vocab, None, profile=True)
    for flag, on in (("route", args.route_variant), ("align", args.align_variant)):
        if not (on and cuda):
            continue
        # the same decode with the router / then also the align step as torch ops (the before)
        from sglite.kernels import fused_moe as fm
        from sglite.runtime.models.layers import moe as moe_layers

        if flag == "route":
            moe_layers.ROUTE_KERNEL = False
        else:
            fm.ALIGN_KERNEL = False
        graphs = runner.graph_runner
        sync()
        graphs.graphs.clear()
        graphs.logits.clear()
        runner.attn_backend.init_cuda_graph_state(graphs.batch_sizes, max_context_len=runner.max_context_len)
        graphs._capture_all()
        decode_at(args, out, runner, args.batches[0], vocab, f"sglite_decode_torch_{flag}")


def decode_at(args, out: Path, runner, bs: int, vocab: int, part: str | None, profile: bool = False):
    """Decode steps of bs requests through the Scheduler: timed (a `part` row), or profiled."""
    import torch

    from sglite.protocol import SamplingParams
    from sglite.runtime.scheduler.req import Req
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()
    sched = Scheduler(runner, max_running_requests=bs, chunked_prefill_size=bs * args.prompt_len,
                      log_interval=0)
    gen = torch.Generator().manual_seed(bs)
    params = SamplingParams(temperature=0, max_new_tokens=2 * args.decode_steps + 16, ignore_eos=True)
    reqs = [Req(rid=f"r{i}", input_ids=torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist(),
                params=params, sink=_Sink()) for i in range(bs)]
    for req in reqs:
        sched.outputs.init_request(req)
        sched.add_request(req)
    while not all(len(r.output_ids) >= 2 for r in reqs):  # prefilled, decode under way
        sched.step()
    for _ in range(3):
        sched.step()
    if profile:
        profile_steps(out, sched, bs)
    else:  # two windows of decode_steps: the spread is the noise; the row keeps the slower
        windows = []
        for _ in range(2):
            sync()
            before, t0 = sum(len(r.output_ids) for r in reqs), time.perf_counter()
            for _ in range(args.decode_steps):
                sched.step()
            sync()
            elapsed = time.perf_counter() - t0
            tokens = sum(len(r.output_ids) for r in reqs) - before
            windows.append((elapsed / (tokens / bs) * 1e3, tokens, elapsed))
        ms_step, tokens, elapsed = max(windows)
        emit(out, dict(part=part, batch=bs, tokens=tokens, seconds=elapsed, tok_s=bs / (ms_step / 1e3),
                       ms_step=ms_step, ms_step_windows=[w[0] for w in windows]))
    while sched.has_work:
        sched.step()
    del sched


def profile_steps(out: Path, sched, bs: int, steps: int = 3):
    """Where a decode step's time goes: host and GPU, kernels by GPU time, and the chrome trace
    (moe_bs<bs>_trace.json) for the gaps between them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sched.step()
        sync()
    print(f"## bs {bs}: {steps} scheduler steps, kernels by GPU time", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90),
          flush=True)
    prof.export_chrome_trace(str(out / f"moe_bs{bs}_trace.json"))


# --- d. transformers baseline: bench/moe_hf.py -------------------------------------------------
def part_hf(args, out: Path, shape: dict):
    import moe_hf  # beside this script

    return moe_hf.part_hf(args, out, shape, emit)


# --- driver -----------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/moe_bench"))
    ap.add_argument("--part", choices=["kernel", "sglite", "hf"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--kernel-tokens", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--hf-steps", type=int, default=12,
                    help="transformers: decode steps a timed run has past its first two")
    ap.add_argument("--hf-repeats", type=int, default=2)
    ap.add_argument("--hf-slope", action="store_true",
                    help="transformers: time generate at 2, 6, 10, 18 tokens and fit the per-step slope")
    ap.add_argument("--hf-slope-batches", type=int, nargs="+", default=[64])
    ap.add_argument("--hf-backends", nargs="+", default=["default", "grouped_mm"],
                    help="transformers decode: 'default' (generate as shipped: batched_mm experts for "
                         "decode) and/or 'grouped_mm' (its decode-stage switch off)")
    ap.add_argument("--hf-default-batches", type=int, nargs="*", default=None,
                    help="batches at which the 'default' backend runs (all when not given)")
    ap.add_argument("--hf-profile", action="store_true",
                    help="profile one transformers generate(6) at the first batch")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--route-variant", action="store_true",
                    help="time the first batch again with the router as torch ops (the before)")
    ap.add_argument("--align-variant", action="store_true",
                    help="time the first batch again with the MoE align step as torch ops (the before)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the first batch's decode steps (kernels by GPU time, chrome trace)")
    ap.add_argument("--parts", nargs="+", default=["kernel", "sglite", "hf"],
                    choices=["kernel", "sglite", "hf"], help="which parts the driver runs")
    ap.add_argument("--timeouts", type=int, nargs=3, default=[80, 170, 120],
                    help="seconds for the kernel, sglite and hf parts")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = TINY if args.tiny else QWEN3_30B_A3B
    folder = out / "qwen3-30b-a3b-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape, indent=2))
    if args.part == "kernel":
        return part_kernel(args, out, shape)
    if args.part == "sglite":
        return part_sglite(args, out, str(folder))
    if args.part == "hf":
        return part_hf(args, out, shape)
    (out / "moe_results.jsonl").unlink(missing_ok=True)
    passthrough = [a for a in sys.argv[1:]]
    for part, timeout in zip(("kernel", "sglite", "hf"), args.timeouts):
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--part", part, *passthrough],
                                  timeout=timeout, capture_output=True, text=True)
            (out / f"moe_{part}.log").write_text(proc.stdout + proc.stderr)
            status = f"rc {proc.returncode}"
            if proc.returncode:
                print(proc.stderr[-3000:], flush=True)
        except subprocess.TimeoutExpired as e:
            status = "timeout"
            text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (e.stdout, e.stderr)]
            (out / f"moe_{part}.log").write_text("".join(text))
        print(f"# part {part}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(out)


def print_table(out: Path):
    path = out / "moe_results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    lines = ["| case | sglite | baseline | ratio | note |", "|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "kernel":
            lines.append(
                f"| fused MoE, {r['tokens']} tokens (ms) | {r['kernel_ms']:.3f} | torch loop "
                f"{r['ref_ms']:.3f} | {r['speedup']:.1f}x | rel err {r['kernel_rel_err']:.1e} "
                f"(loop {r['ref_rel_err']:.1e}); {r['experts_hit']} experts hit, floor "
                f"{r['floor_ms']:.3f} ms ({r['floor_ms'] / r['kernel_ms']:.0%}) |")
    for r in rows:
        if r["part"] == "align":
            lines.append(f"| MoE align step, {r['tokens']} tokens (us a layer, in a graph) | "
                         f"{r['kernel_us']:.1f} | torch ops {r['torch_us']:.1f} | "
                         f"{r['torch_us'] / r['kernel_us']:.1f}x | equal to the torch ops: "
                         f"{r['kernel_equal']} |")
    for r in rows:
        if r["part"] == "hf_decode":
            slope = (f"; slope over generate({r['slope_lens']}) {r['ms_step_slope']:.1f} ms/step "
                     f"(best-of seconds {[round(x, 3) for x in r['slope_seconds']]})" if "ms_step_slope" in r else "")
            lines.append(f"| transformers bs{r['batch']} ({r['impl']}) ms/step | | {r['ms_step']:.1f} | | "
                         f"per-step median {r['ms_step_median']:.1f} (min {r['ms_step_min']:.1f}, max "
                         f"{r['ms_step_max']:.1f}; run medians {[round(x, 1) for x in r['ms_step_run_medians']]})"
                         f"{slope} |")
        elif r["part"] == "hf_profile":
            lines.append(f"| transformers bs{r['batch']} generate({r['tokens']}) under the profiler | | "
                         f"wall {r['wall_s']:.2f} s | | GPU kernel time {r['gpu_busy_s']:.2f} s, "
                         f"{r['kernel_launches']} launches |")
    hf = {}
    for r in rows:  # the fastest transformers figure at each batch: the baseline
        if r["part"] == "hf_decode":
            ms = r["ms_step"]
            if r["batch"] not in hf or ms < hf[r["batch"]]["ms_step"]:
                hf[r["batch"]] = dict(ms_step=ms, tok_s=r["batch"] / (ms / 1e3))
    bw = next((r["copy_gbs"] for r in rows if r["part"] in ("kernel", "sglite_load") and "copy_gbs" in r),
              float("nan"))
    weight_gb = next((r["weight_gb"] for r in rows if r["part"] == "sglite_load"), float("nan"))
    for r in rows:
        if r["part"].startswith("sglite_decode"):
            b = hf.get(r["batch"])
            base = f"{b['tok_s']:.0f} ({b['ms_step']:.1f} ms/step)" if b else "n/a"
            ratio = f"{r['tok_s'] / b['tok_s']:.1f}x" if b else "n/a"
            floor = weight_gb / bw * 1e3  # every expert is hit at these batches
            label = {"sglite_decode_torch_align": " (router and align as torch ops)",
                     "sglite_decode_torch_route": " (router as torch ops)"}.get(r["part"], "")
            windows = " / ".join(f"{w:.2f}" for w in r.get("ms_step_windows", []))
            lines.append(f"| decode bs{r['batch']}{label} tok/s | {r['tok_s']:.0f} ({r['ms_step']:.1f} "
                         f"ms/step; windows {windows}) | transformers {base} | {ratio} | weight-read floor "
                         f"{floor:.1f} ms/step ({floor / r['ms_step']:.0%}) |")
    for r in rows:
        if r["part"] in ("sglite_load", "hf_load") or "sweep" in r:
            lines.append(f"<!-- {json.dumps(r)} -->")
    text = "\n".join(lines)
    (out / "moe_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
