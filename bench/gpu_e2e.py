"""End to end on GPU (issue 6, plus issue 7's windowed decode), baselines in the same run:

a. batch-1 decode ms/token (CUDA graphs, the runner's whole step incl. batch building and the
   argmax read-back) vs the weight-bandwidth floor: weight bytes / d2d copy bandwidth (measured);
b. offline throughput: N requests through the real runtime (`python -m sglite serve` spawned by
   RuntimeProcess, GenerateReqs over ZMQ) vs transformers `generate` (sdpa, bf16, same shape and
   N(0, 0.02) init) at batch 128 on a subset, extrapolated as tokens/s;
c. decode steps/s with B requests of a long context in the pool, sliding window W + G global
   tokens on every layer vs full attention (same shape, same random KV).

    python bench/gpu_e2e.py                      # H100/H200: llama-3-8b shape
    python bench/gpu_e2e.py --device cpu --preset tiny --num-requests 8 --prompt-len 16 \\
        --output-len 8 --hf-batch 4 --hf-batches 1 --context 512 --window 64 --window-bs 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import uuid

import torch

from sglite.runtime.models.config import ModelConfig
from sglite.runtime.executor.model_runner import ModelRunner

ROWS: list[tuple] = []  # (case, sglite, baseline name, baseline, ratio, note)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(calls) -> torch.cuda.CUDAGraph:
    """One CUDA graph holding the calls (as decode runs in the runtime: launch overhead out), after
    a warm-up run on a side stream (compiles, settles the allocator) outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 2 / sorted(times)[len(times) // 2]


def decode_loop(runner, rows, seq_lens, last, steps, **kw) -> float:
    """Seconds per decode step of the runner's full path: batch build, forward, argmax to host."""
    seq_lens = list(seq_lens)
    for i in range(steps + 3):
        if i == 3:  # warm-up done
            sync(runner.device)
            t0 = time.perf_counter()
        seq_lens = [s + 1 for s in seq_lens]
        slots = runner.token_pool.alloc(len(rows))
        logits, _ = runner.forward_decode(rows, seq_lens, last, slots, **kw)
        last = logits.argmax(-1).tolist()
    return (time.perf_counter() - t0) / steps


def bench_batch1(args, device, copy_bw):
    runner = ModelRunner(preset=args.preset, load_format="dummy", device=str(device),
                         dtype="bfloat16", max_total_tokens=4096, max_running_requests=2,
                         cuda_graph_max_bs=1)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    floor = weight_bytes / copy_bw
    row = runner.req_to_token.alloc()
    prompt = torch.randint(0, runner.model_config.vocab_size, (128,)).tolist()
    batch = runner.make_extend_batch([row], [0], [prompt], runner.token_pool.alloc(128))
    last = runner.forward(batch).argmax(-1).tolist()
    steps = args.decode_steps
    graph_s = decode_loop(runner, [row], [128], last, steps)
    eager_s = decode_loop(runner, [row], [128 + steps + 3], last, steps, use_cuda_graph=False)
    note = f"weights {weight_bytes / 1e9:.2f} GB, copy {copy_bw / 1e9:.0f} GB/s"
    if runner.graph_runner is not None:  # GPU time alone: back-to-back replays, no host work
        graph = runner.graph_runner.graphs[1]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        sync(device)
        replay_s = (time.perf_counter() - t0) / steps
        note += f"; replay alone {replay_s * 1e3:.2f} ms ({floor / replay_s:.0%} of floor)"
    ROWS.append((f"a. {args.preset} bs1 decode ms/token (graphs)", graph_s * 1e3,
                 "weight floor ms", floor * 1e3, floor / graph_s, note))
    ROWS.append((f"a. {args.preset} bs1 decode ms/token (eager)", eager_s * 1e3,
                 "weight floor ms", floor * 1e3, floor / eager_s, "no CUDA graphs"))
    del runner, batch


def bench_window(args, device):
    """Issue 7: decode with long contexts already in the pool, windowed vs full attention."""
    bs, ctx, steps = args.window_bs, args.context, args.decode_steps
    results = {}
    for name, overrides in (("full", {}), ("window", dict(sliding_window=args.window,
                                                          global_tokens=args.globals_))):
        runner = ModelRunner(preset=args.preset, load_format="dummy", device=str(device),
                             dtype="bfloat16", max_total_tokens=bs * (ctx + steps + 8),
                             max_running_requests=bs, max_context_len=ctx + steps + 8,
                             cuda_graph_max_bs=bs, config_overrides=overrides)
        gen = torch.Generator(device).manual_seed(0)
        for i in range(runner.kv_cache.num_buffers):  # random KV, as if prefilled
            for buf in runner.kv_cache.get_kv(i):
                buf.normal_(generator=gen)
        rows = [runner.req_to_token.alloc() for _ in range(bs)]
        for r in rows:  # each request's context at shuffled slots (a pool after churn)
            slots = runner.token_pool.alloc(ctx)
            runner.req_to_token.write(r, 0, slots[torch.randperm(ctx)])
        last = torch.randint(0, runner.model_config.vocab_size, (bs,)).tolist()
        results[name] = decode_loop(runner, rows, [ctx - 1] * bs, last, steps)
        del runner
        torch.cuda.empty_cache() if device.type == "cuda" else None
    w = f"W={args.window} + G={args.globals_}"
    ROWS.append((f"c. {args.preset} bs{bs} x {ctx} ctx decode steps/s, {w}", 1 / results["window"],
                 "full attention steps/s", 1 / results["full"], results["full"] / results["window"],
                 f"ms/step {results['window'] * 1e3:.2f} vs {results['full'] * 1e3:.2f}"))


def bench_profile(args, device):
    """Where a decode step's time goes: bs 1 kernels by total GPU time (eager forward under the
    profiler: kernel durations, no launch gaps), and bs N = --max-running with contexts of
    prompt + output/2 tokens: the runner's whole step vs graph replay alone (GPU time)."""
    from torch.profiler import ProfilerActivity, profile

    bs, ctx = args.max_running or 256, args.prompt_len + args.output_len // 2
    runner = ModelRunner(preset=args.preset, load_format="dummy", device=str(device),
                         dtype="bfloat16", max_total_tokens=bs * (ctx + 80),
                         max_running_requests=bs, cuda_graph_max_bs=bs)
    rows = [runner.req_to_token.alloc() for _ in range(bs)]
    for r in rows:
        runner.req_to_token.write(r, 0, runner.token_pool.alloc(ctx))
    last = torch.randint(0, runner.model_config.vocab_size, (bs,)).tolist()
    step_s = decode_loop(runner, rows, [ctx - 1] * bs, last, 32)
    replay_s = float("nan")
    if runner.graph_runner is not None:
        graph = runner.graph_runner.graphs[bs]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(32):
            graph.replay()
        sync(device)
        replay_s = (time.perf_counter() - t0) / 32
    ROWS.append((f"p. {args.preset} bs{bs} x {ctx} ctx decode ms/step (runner path)", step_s * 1e3,
                 "graph replay alone ms", replay_s * 1e3, replay_s / step_s,
                 f"{bs / step_s:.0f} tok/s runner path"))
    batch_args = ([rows[0]], [ctx + 40], last[:1], runner.token_pool.alloc(1))
    runner.forward(runner.make_decode_batch(*batch_args), use_cuda_graph=False)
    sync(device)
    kind = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[kind]) as prof:
        for _ in range(3):
            runner.forward(runner.make_decode_batch(*batch_args), use_cuda_graph=False)
        sync(device)
    print(prof.key_averages().table(sort_by=f"{device.type}_time_total", row_limit=25, max_name_column_width=70))
    del runner


def hf_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM


    c = ModelConfig.from_preset(args.preset)
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=0.02,
        attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval(), c.vocab_size


def bench_hf(args, device) -> float:
    model, vocab = hf_model(args, device)
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=args.output_len,
              min_new_tokens=args.output_len)  # ignore_eos
    with torch.inference_mode():
        model.generate(torch.randint(0, vocab, (2, 8), device=device), **{**kw, "max_new_tokens": 4,
                                                                           "min_new_tokens": 4})
        sync(device)
        t0, tokens = time.perf_counter(), 0
        for _ in range(args.hf_batches):
            ids = torch.randint(0, vocab, (args.hf_batch, args.prompt_len), device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            tokens += (out.shape[1] - args.prompt_len) * out.shape[0]
        sync(device)
    elapsed = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return tokens / elapsed


def bench_server(args, device) -> tuple[float, dict, str]:
    import zmq

    from sglite import protocol
    from sglite.launch import RuntimeProcess, wait_reply

    server_args = dict(device=str(device), load_format="dummy", preset=args.preset, log_interval=5.0,
                       max_running_requests=args.max_running, cuda_graph_max_bs=args.cuda_graph_max_bs,
                       chunked_prefill_size=args.chunked_prefill,
                       page_size=args.page_size)  # None: the server's defaults
    with RuntimeProcess(None, timeout=600, **server_args) as rt:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(rt.address)
        vocab = rt.info["vocab_size"]

        def run(prompts, max_new_tokens) -> int:
            """Send all, wait for all; the completion tokens."""
            params = dict(max_new_tokens=max_new_tokens, ignore_eos=True, temperature=0.0)
            for i, ids in enumerate(prompts):
                sock.send(protocol.encode(protocol.GenerateReq(rid=f"b{i}-{uuid.uuid4().hex[:6]}",
                                                               input_ids=ids, sampling_params=params)))
            done, tokens = 0, 0
            while done < len(prompts):
                reply = wait_reply(sock, alive=rt.is_alive, timeout=600, describe=rt.log_tail)
                if isinstance(reply, protocol.ErrorOut):
                    raise RuntimeError(f"runtime error: {reply.message}")
                if reply.finished:
                    done += 1
                    tokens += reply.meta_info["completion_tokens"]
            return tokens

        # warm-up, untimed: Triton compiles each kernel specialization on first use (a cold
        # machine's first run spent ~2.7 s more in extend forwards: H200, 14.8 vs 12.0 s)
        run(torch.randint(0, vocab, (min(64, args.num_requests), args.prompt_len)).tolist(), 16)
        prompts = torch.randint(0, vocab, (args.num_requests, args.prompt_len)).tolist()
        t0 = time.perf_counter()
        tokens = run(prompts, args.output_len)
        elapsed = time.perf_counter() - t0
        sock.send(protocol.encode(protocol.InfoReq(rid="counters")))
        info = wait_reply(sock, alive=rt.is_alive, timeout=60).info
        info["server_args"] = (f"max running {info['max_running_requests']}, chunked prefill "
                               f"{rt.args.chunked_prefill_size}, graphs up to bs {info['cuda_graph_max_bs']}, "
                               f"page size {rt.args.page_size}")
        log = open(rt.log_path).read()
        sock.close()
    return tokens / elapsed, info, log


def bench_server_batch1(args, device, copy_bw):
    """Batch-1 decode end to end through `sglite serve` (overlapped decode on): the time of a
    long greedy request minus a 2-token one with the same prompt, per extra token."""
    import zmq

    from sglite import protocol
    from sglite.launch import RuntimeProcess, wait_reply

    server_args = dict(device=str(device), load_format="dummy", preset=args.preset,
                       max_running_requests=4, max_total_tokens=8192, log_interval=0,
                       page_size=args.page_size)
    with RuntimeProcess(None, timeout=600, **server_args) as rt:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(rt.address)
        prompt = torch.randint(0, rt.info["vocab_size"], (128,)).tolist()

        def timed(num_tokens: int, kind: str) -> tuple[float, int]:
            """Seconds and completion tokens of one request of this kind."""
            params = dict(max_new_tokens=num_tokens, ignore_eos=kind != "eos", temperature=0.0)
            if kind == "sampled":
                params.update(temperature=0.7, top_p=0.9)
            elif kind == "penalized":
                params.update(repetition_penalty=1.1, frequency_penalty=0.2)
            t0 = time.perf_counter()
            sock.send(protocol.encode(protocol.GenerateReq(
                rid=uuid.uuid4().hex, input_ids=prompt, sampling_params=params)))
            reply = wait_reply(sock, alive=rt.is_alive, timeout=600, describe=rt.log_tail)
            if isinstance(reply, protocol.ErrorOut):
                raise RuntimeError(reply.message)
            return time.perf_counter() - t0, reply.meta_info["completion_tokens"]

        def seconds_per_token(kind: str) -> float:
            """(long - 2-token request) / extra tokens, best of 3 after a warm-up."""
            timed(long_len, kind)
            best = float("inf")
            for _ in range(3):
                (t_long, n_long), (t_short, n_short) = timed(long_len, kind), timed(2, kind)
                if n_long < long_len // 2:  # "eos": random weights picked EOS early (rare)
                    raise RuntimeError(f"{kind}: the long request stopped after {n_long} tokens")
                best = min(best, (t_long - t_short) / (n_long - n_short))
            return best

        long_len = 2 + args.decode_steps * 4
        # greedy + ignore_eos: only max_new_tokens ends it; "eos": EOS could (random weights
        # hardly ever pick it: the usual chat request); "sampled": temperature 0.7, top_p 0.9
        kinds = {"greedy": "greedy, ignore_eos", "eos": "greedy, EOS can stop it",
                 "sampled": "temperature 0.7 top_p 0.9, ignore_eos",
                 "penalized": "greedy, repetition 1.1 + frequency 0.2 penalties, ignore_eos"}
        per_token = {kind: seconds_per_token(kind) for kind in kinds}
        sock.close()
    cfg = ModelConfig.from_preset(args.preset)
    weight_bytes = 2 * _num_params(cfg)  # bf16
    floor = weight_bytes / copy_bw
    for kind, what in kinds.items():
        ROWS.append((f"s. {args.preset} bs1 decode ms/token through `sglite serve`, {what}",
                     per_token[kind] * 1e3, "weight floor ms", floor * 1e3, floor / per_token[kind],
                     f"(long - 2-token request) / extra tokens, best of 3; weights "
                     f"{weight_bytes / 1e9:.2f} GB counted from the preset"))


def gemm_roof(device, cfg) -> float:
    """FLOP/s of the best bf16 matmul among the model's projections at a 4096-token chunk
    (the extend forwards' shapes), measured here: the compute ceiling of part b's bound."""
    from triton.testing import do_bench

    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    h = cfg.num_heads * cfg.head_dim
    best = 0.0
    for k, n in ((d, h + 2 * kv), (h, d), (d, 2 * cfg.intermediate_size), (cfg.intermediate_size, d)):
        a = torch.randn(4096, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        ms = do_bench(lambda: torch.nn.functional.linear(a, w), warmup=25, rep=100, return_mode="median")
        best = max(best, 2 * 4096 * k * n / ms * 1e3)
    return best


def offline_floor_s(args, cfg, flops_per_s, bytes_per_s) -> tuple[float, float]:
    """(compute, memory) seconds of part b's GPU work, generously counted. Compute: every matmul
    FLOP at the best measured matmul rate (prompt tokens through all layers, output tokens
    through all layers and the LM head) plus the prompts' causal attention FLOPs at that rate.
    Memory: the decode steps' KV reads plus one weight read per decode step, with the fewest
    steps possible (every request in one batch), at the copy rate. Norms, sampling and the host
    are free. Kernels run one after another (as sglite runs them) cannot beat compute + memory;
    no schedule beats max(compute, memory), which needs the memory-bound attention of one
    micro-batch to run concurrently with another's matmuls."""
    d, L, n = cfg.hidden_size, cfg.num_layers, args.num_requests
    p, o = args.prompt_len, args.output_len
    layer_params = _num_params(cfg) - cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) - d
    per_token = 2 * layer_params  # FLOPs through the decoder layers
    decoded = n * (o - 1)  # tokens fed back through the model (the first comes from the extend)
    matmul = per_token * n * p + per_token * decoded + 2 * cfg.vocab_size * d * n * o
    attn = 4 * L * cfg.num_heads * cfg.head_dim * n * p * (p + 1) / 2
    kv_bytes_per_token = 2 * L * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16
    kv_read = n * sum(p + i for i in range(1, o)) * kv_bytes_per_token
    weight_reads = (o - 1) * 2 * _num_params(cfg)
    return (matmul + attn) / flops_per_s, (kv_read + weight_reads) / bytes_per_s


def _num_params(cfg) -> int:
    d, h, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = d * (h + 2 * kv) + h * d + 3 * d * cfg.intermediate_size + 2 * d
    embed = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * layer + embed + d


def run_part(name, fn, *a):
    print(f"--- {name}", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn(*a)
    except Exception:
        traceback.print_exc()
        out = None
    print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--parts", default="a,c,b")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=None,
                    help="part b's server (default: the server's own; part p: 256)")
    ap.add_argument("--chunked-prefill", type=int, default=None, help="part b's server (default: the server's own)")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None,
                    help="part b's server: largest decode batch replayed from a CUDA graph "
                    "(default: the server's own)")
    ap.add_argument("--page-size", type=int, default=None,
                    help="parts b and s: the server's KV page size (default: the server's own)")
    ap.add_argument("--hf-batch", type=int, default=128)
    ap.add_argument("--hf-batches", type=int, default=2)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--globals", dest="globals_", type=int, default=4)
    ap.add_argument("--window-bs", type=int, default=8)
    ap.add_argument("--no-hf", action="store_true", help="part b without the transformers run "
                    "(e.g. a second runtime version in the same call)")
    args = ap.parse_args()
    device = torch.device(args.device)
    parts = args.parts.split(",")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"card: {card}, torch {torch.__version__}", flush=True)
    copy_bw = copy_bandwidth(device)
    if "a" in parts:
        run_part("a: batch-1 decode", bench_batch1, args, device, copy_bw)
    if "c" in parts:
        run_part("c: window decode", bench_window, args, device)
    if "p" in parts:
        run_part("p: decode profile", bench_profile, args, device)
    if "s" in parts:
        run_part("s: batch-1 decode through the server", bench_server_batch1, args, device,
                 copy_bw)
    out_dir, extra = os.environ.get("OUT"), {}
    if "b" in parts:
        hf = None if args.no_hf else run_part("b: transformers generate", bench_hf, args, device)
        roof = gemm_roof(device, ModelConfig.from_preset(args.preset)) if device.type == "cuda" else None
        srv = run_part("b: sglite runtime", bench_server, args, device)
        if srv is not None:
            tps, info, log = srv
            extra["server_counters"] = info.get("counters", info)
            if out_dir:
                open(os.path.join(out_dir, "server.log"), "w").write(log)
            print("server log tail:\n" + log[-3000:])
            c = extra["server_counters"]
            keys = ("num_steps", "schedule_time_s", "prefill_time_s", "decode_time_s",
                    "num_prefill_tokens", "num_decode_tokens", "num_retractions")
            print("server counters:", {k: c.get(k) for k in keys}, flush=True)
            ROWS.append((f"b. {args.num_requests} req x {args.prompt_len}+{args.output_len} out tok/s",
                         tps, f"HF generate bs{args.hf_batch} x{args.hf_batches} tok/s",
                         hf or float("nan"), tps / hf if hf else float("nan"),
                         f"HF extrapolated from its subset; server ({info['server_args']}): {c.get('num_steps')} steps, "
                         f"schedule {c.get('schedule_time_s')} s (incl. waits for the GPU), "
                         f"extend {c.get('prefill_time_s')} s"))
            if roof and hf:
                compute_s, memory_s = offline_floor_s(args, ModelConfig.from_preset(args.preset), roof, copy_bw)
                out_tokens = args.num_requests * args.output_len
                for name, floor_s in (("serial floor: compute + memory, kernels one after another",
                                       compute_s + memory_s),
                                      ("overlap floor: max(compute, memory), attention concurrent "
                                       "with matmuls", max(compute_s, memory_s))):
                    bound = out_tokens / floor_s
                    ROWS.append((f"b. {name}", bound, "HF generate tok/s", hf, bound / hf,
                                 f"{floor_s:.1f} s (compute {compute_s:.1f} s at the {roof / 1e12:.0f} "
                                 f"TFLOP/s matmul roof measured here, memory {memory_s:.1f} s); "
                                 f"sglite reaches {tps / bound:.0%} of it"))
    print(f"\ncard: {card}; d2d copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    print("| case | sglite | baseline | baseline value | ratio | note |\n|---|---|---|---|---|---|")
    for case, ours, base_name, base, ratio, note in ROWS:
        print(f"| {case} | {ours:.3f} | {base_name} | {base:.3f} | {ratio:.2f} | {note} |")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_e2e.json"), "w") as f:
            json.dump({"card": card, "rows": ROWS, **extra}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
