"""Batch-1 decode of a dense family at a real shape vs the weight-bandwidth floor, with
transformers `generate` at batch 1 beside it (issue 18).

Random bf16 weights: sglite serves a config-only folder written here with load_format=dummy;
transformers builds the same config with its own init. sglite's number is the runner's whole step
(batch build, CUDA graph replay, argmax read back to the host), as bench/gpu_e2e.py part a, and
with --scheduler the same request decoded through the Scheduler (as served: its overlapped loop
builds the next batch while the GPU runs this one); the floor is the weight bytes over the measured device-to-device copy bandwidth (bytes read plus
written); transformers is (generate(1 + N) - generate(1)) / N at batch 1 (decode steps only).

    python bench/decode_floor.py --config gemma2-9b            # H100/H200
    python bench/decode_floor.py --config tiny-gemma2 --device cpu --steps 4 --hf-steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from decode_paths import check_paths, gemv_off_check, graph_trace, scheduler_decode  # beside this script
from sglite.runtime.executor.model_runner import ModelRunner

_GEMMA2_9B = dict(
    architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000, hidden_size=3584,
    intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
    bos_token_id=2, eos_token_id=1, pad_token_id=0, torch_dtype="bfloat16",
    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(42)],
)
_PHI3_MINI = dict(  # Phi-3-mini-4k-instruct
    architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32064, hidden_size=3072,
    intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    hidden_act="silu", max_position_embeddings=4096, original_max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000, torch_dtype="bfloat16",
)
CONFIGS = {
    "gemma2-9b": _GEMMA2_9B,
    "phi3-mini": _PHI3_MINI,
    "tiny-gemma2": {**_GEMMA2_9B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": 16, "sliding_window": 64, "layer_types": ["sliding_attention",
                                                                         "full_attention"] * 2},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written (median of 20)."""
    src = torch.empty(1 << 29 if device.type == "cuda" else 1 << 22, dtype=torch.int16,
                      device=device).random_()
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


def copy_bandwidth_events(device) -> float | None:
    """The same copy timed with CUDA events around 20 copies (no host sync between them): the
    host-timed figure above includes each copy's launch and synchronize."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    sync(device)
    return 2 * src.numel() * 2 * 20 / (start.elapsed_time(end) * 1e-3)


def decode_loop(runner, row, seq_len, last, steps) -> float:
    """Seconds per decode step of the runner's whole path (batch build, forward, argmax to host)."""
    for i in range(steps + 3):
        if i == 3:
            sync(runner.device)
            t0 = time.perf_counter()
        seq_len += 1
        logits, _ = runner.forward_decode([row], [seq_len], last, runner.token_pool.alloc(1))
        last = logits.argmax(-1).tolist()
    assert torch.isfinite(logits).all()
    return (time.perf_counter() - t0) / steps


def bench_sglite(args, folder, device, prompt):
    # as served: graphs captured for the model's context limit (a server's pool holds far more
    # than it); --max-context pool sizes it from this benchmark's small pool (the first call's
    # setup: 592 tokens, so the decode kernel ran 5 splits of 128 keys instead of 33)
    ctx = None if args.max_context == "pool" else int(args.max_context or
                                                     json.load(open(os.path.join(folder, "config.json")))[
                                                         "max_position_embeddings"])
    runner = ModelRunner(folder, load_format="dummy", device=str(device), dtype="bfloat16",
                         max_total_tokens=len(prompt) + 4 * args.steps + 128, max_running_requests=2,
                         cuda_graph_max_bs=1, skip_tokenizer_init=True, max_context_len=ctx)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    row = runner.req_to_token.alloc()
    check = check_paths(runner, row, prompt)
    print(f"served path (graph, GEMV, chain) vs eager cuBLAS, logits per step: {check}", flush=True)
    if args.rope_check:
        rope_check(runner, row, prompt, ctx)
    if args.check_only:
        gemv_off_check(runner, row, prompt, recapture)
        raise SystemExit(0)
    if args.attn_sweep and device.type == "cuda":
        attn_sweep(runner)
    step_s, replay_s, last = measure(args, runner, row, prompt)
    sched_s = scheduler_decode(args, runner, prompt) if args.scheduler else []
    if args.gemv_sweep and device.type == "cuda":
        from sglite.kernels import gemv

        gemv.TILES.update(gemv_sweep(runner))  # the GEMV variants run the best tiles found here
    variants = []
    if args.variants and runner.graph_runner is not None:
        variants = run_variants(args, runner, row, prompt, ctx)
    if args.profile:
        profile_step(args, runner, row, len(prompt) + 2 * (args.steps + 3), last)
    cfg = runner.model_config
    kv_bytes = runner.kv_cache.total_bytes // runner.kv_cache.capacity  # per token, all layers
    del runner
    return weight_bytes, step_s, replay_s, kv_bytes, cfg, variants, sched_s, check


def measure(args, runner, row, prompt):
    """Prefill the prompt afresh (pool reset), then the whole step twice and the replay alone."""
    runner.token_pool.reset()
    loc = runner.token_pool.alloc(len(prompt))
    last = runner.forward(runner.make_extend_batch([row], [0], [prompt], loc)).argmax(-1).tolist()
    step_s = [decode_loop(runner, row, len(prompt) + r * (args.steps + 3), last, args.steps)
              for r in range(2)]  # twice: the spread is the noise
    replay_s = None
    if runner.graph_runner is not None:
        graph = runner.graph_runner.graphs[1]
        sync(runner.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            graph.replay()
        sync(runner.device)
        replay_s = (time.perf_counter() - t0) / args.steps
    return step_s, replay_s, last


def recapture(runner, ctx) -> None:
    """Capture the decode graphs again (after a kernel switch), sized for context limit ctx."""
    graphs = runner.graph_runner
    sync(runner.device)
    graphs.graphs.clear()
    graphs.logits.clear()
    runner.attn_backend.init_cuda_graph_state(graphs.batch_sizes, max_context_len=ctx)
    graphs._capture_all()


def run_variants(args, runner, row, prompt, ctx):
    """The same runner with one thing changed at a time (graphs captured again for each): each
    of the batch-1 fusions / early launches off, the norm prologue and the L2 prefetch on (off by
    default until timed), the fifth session's default, and the projections on cuBLAS without the
    chained early launch (SGLITE_GEMV=0) (--variant-set seventh); the eighth session's sets: the
    fused launches outside the layers off, GEMV weight chunks before the wait (DEPTH), decode
    attention's d256 tiles, the norms' warps. Each variant's graph logits on the same tokens against the served graph's
    (bit-equal where only launches or fusions with the same roundings differ); with --scheduler
    each variant also decoded through the Scheduler (as served)."""
    from sglite.kernels import decode_attention, gemv, gemv_pairs, norm
    from sglite.runtime.models import gemma

    served_ctx = runner.max_context_len
    knobs = {"rope": (gemv_pairs, "ROPE"), "glu": (gemv_pairs, "GLU"), "norm": (gemv_pairs, "NORM"),
             "norm_tiles": (gemv_pairs, "NORM_TILES"), "prefetch": (gemv, "PREFETCH"),
             "attn_early": (decode_attention, "EARLY_DEPENDENTS"), "embed": (gemma, "FUSED_EMBED"),
             "softcap": (gemma, "FUSED_SOFTCAP"), "depth": (gemv, "DEPTH"),
             "attn_tiles": (decode_attention, "decode_tiles"), "norm_warps": (norm, "NUM_WARPS"),
             "early_tile": (decode_attention, "EARLY_TILE"), "gemv_tiles": (gemv, "TILES"),
             "pair_tiles": (gemv_pairs, "TILES")}
    saved = {key: getattr(mod, attr) for key, (mod, attr) in knobs.items()}
    all4 = gemma.GEMV_PROJECTIONS
    cases = (_cases_seventh(all4) if args.variant_set == "seventh" else _cases_ninth(all4)
             if args.variant_set == "ninth" else _cases_tenth(all4, saved["attn_tiles"])
             if args.variant_set == "tenth" else
             _cases_eighth(all4, saved["attn_tiles"], short=args.variant_set == "eighth-tiles"))
    base, fed = graph_trace(runner, row, prompt)
    out = []
    for name, which, values in cases:
        try:
            gemma.set_one_row_gemv(runner.model, which)
            gemv.ENABLED = bool(which)
            for key, value in values.items():
                setattr(*knobs[key], value)
            recapture(runner, served_ctx)
            logits, _ = graph_trace(runner, row, prompt, fed)
            diff = (logits - base).abs().max().item()
            rel = ((logits - base).norm(dim=-1) / base.norm(dim=-1)).max().item()
            # fed the served graph's tokens: the same argmax at every step = the same greedy tokens
            same = int((logits.argmax(-1) == base.argmax(-1)).sum())
            step_s, replay_s, _ = measure(args, runner, row, prompt)
            if args.scheduler:
                step_s = step_s + scheduler_decode(args, runner, prompt)
            out.append((f"{name} [vs served: max |logit diff| {diff:.3g}, max rel err {rel:.2e}, "
                        f"same argmax {same}/{len(fed)}]", step_s, replay_s))
        except Exception as e:  # noqa: BLE001 (a variant that fails: say so, go on)
            print(f"variant {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        finally:
            gemma.set_one_row_gemv(runner.model)
            gemv.ENABLED = True
            for key, (mod, attr) in knobs.items():
                setattr(mod, attr, saved[key])
        print(f"variant done: {name}: {out[-1] if out and out[-1][0].startswith(name) else 'failed'}", flush=True)
    recapture(runner, ctx or served_ctx)
    return out


def _d256_tiles(decode_tiles, **tiles):
    """A decode_tiles stand-in that overrides the GPU's d256 (Gemma) tiles with `tiles`."""
    def pick(head_dim, **kw):
        cfg = decode_tiles(head_dim, **kw)
        return dict(cfg, **tiles) if head_dim > 128 and kw["device"].type == "cuda" else cfg
    return pick


def _cases_tenth(all4, decode_tiles):
    """The tenth session's: the step's launches in the chain with other tiles, one at a time: the
    norms' warps, no weights before the GEMVs' wait, the o / down GEMVs' rows and chunks (gemv.TILES;
    Gemma-2-9B's o is [3584, 4096], down [3584, 14336]), the pair GEMVs' chunks (qkv + rotary,
    gate_up + GeGLU), decode attention's d256 tiles with 64 keys (half the splits at short contexts)."""
    def tiles(n, k, rows, cols, warps):
        return {(n, k): dict(BLOCK_N=rows, BLOCK_K=cols, num_warps=warps, num_stages=1)}

    o, down = (3584, 4096), (3584, 14336)
    return [("served again (same graphs: the determinism check)", all4, {}),
            ("norm kernels with 4 warps (8 by default at 3584)", all4, dict(norm_warps=4)),
            ("norm kernels with 16 warps", all4, dict(norm_warps=16)),
            ("no weights before the GEMVs' PDL wait (SGLITE_GEMV_DEPTH=0)", all4, dict(depth=0)),
            ("o GEMV 1 row x 512, 4 warps (default 2 x 512, 4)", all4, dict(gemv_tiles=tiles(*o, 1, 512, 4))),
            ("o GEMV 2 rows x 1024, 8 warps", all4, dict(gemv_tiles=tiles(*o, 2, 1024, 8))),
            ("o GEMV 4 rows x 256, 4 warps", all4, dict(gemv_tiles=tiles(*o, 4, 256, 4))),
            ("down GEMV 2 rows x 1024, 4 warps (default 2 x 2048, 8)", all4,
             dict(gemv_tiles=tiles(*down, 2, 1024, 4))),
            ("down GEMV 1 row x 2048, 8 warps", all4, dict(gemv_tiles=tiles(*down, 1, 2048, 8))),
            ("down GEMV 4 rows x 1024, 8 warps", all4, dict(gemv_tiles=tiles(*down, 4, 1024, 8))),
            ("pair GEMVs 1024 columns, 8 warps (default 512, 4)", all4,
             dict(pair_tiles=dict(block_k=1024, num_warps=8))),
            ("pair GEMVs 256 columns, 2 warps", all4, dict(pair_tiles=dict(block_k=256, num_warps=2))),
            ("decode attention d256 tiles: 64 keys, 4 warps (default 32)", all4,
             dict(attn_tiles=_d256_tiles(decode_tiles, BLOCK_N=64))),
            ("served again, graphs captured again", all4, {})]


def _cases_ninth(all4):
    """The ninth session's: decode attention's first tile after its PDL wait again (as before)."""
    return [("served again (same graphs: the determinism check)", all4, {}),
            ("decode attention's first tile loaded after the wait (SGLITE_DECODE_EARLY_TILE=0)", all4,
             dict(early_tile=False)),
            ("served again, graphs captured again", all4, dict(early_tile=True))]


def _cases_eighth(all4, decode_tiles, short=False):
    """The eighth session's: the launches outside the layers back on torch, each fusion alone, two
    weight chunks in flight in every GEMV, decode attention's d256 tiles (short: the tiles only)."""
    served = ("served again (same graphs: the determinism check)", all4, {})
    torch_ends = ("torch ends (embedding scale, cos / sin, soft-cap as the seventh session's)", all4,
                  dict(embed=False, softcap=False))
    old_tiles = ("decode attention d256 tiles: 32 keys, 4 warps (the seventh session's)", all4,
                 dict(attn_tiles=_d256_tiles(decode_tiles, BLOCK_N=32)))
    if short:  # the second call: decode attention's d256 tiles around the new default (16 keys)
        return [served, old_tiles,
                ("decode attention d256 tiles: 16 keys, 2 warps", all4,
                 dict(attn_tiles=_d256_tiles(decode_tiles, num_warps=2))),
                ("no weights before the GEMVs' PDL wait (SGLITE_GEMV_DEPTH=0)", all4, dict(depth=0)),
                ("norm kernels with 16 warps (8 by default at 3584)", all4, dict(norm_warps=16)),
                ("norm kernels with 4 warps", all4, dict(norm_warps=4)),
                torch_ends]
    return [
        served, torch_ends,
        ("fused soft-cap only (torch embedding scale, cos / sin)", all4, dict(embed=False)),
        ("fused embedding + cos / sin only (torch soft-cap)", all4, dict(softcap=False)),
        ("two weight chunks in flight in every GEMV (SGLITE_GEMV_DEPTH=2)", all4, dict(depth=2)),
        old_tiles,
        ("decode attention d256 tiles: 64 keys, 8 warps", all4,
         dict(attn_tiles=_d256_tiles(decode_tiles, BLOCK_N=64, num_warps=8))),
        ("decode attention d256 tiles: 16 keys, 4 warps", all4,
         dict(attn_tiles=_d256_tiles(decode_tiles, BLOCK_N=16, num_warps=4))),
        ("decode attention d256 tiles: 32 keys, 4 warps, 1 stage", all4,
         dict(attn_tiles=_d256_tiles(decode_tiles, BLOCK_N=32, num_stages=1))),
    ]


def _cases_seventh(all4):
    """The seventh session's (the L2 prefetch, the norm prologue; each sixth-session change off)."""
    return [  # (name, projections through the GEMV (none: gemv.ENABLED off, so no chain), knob values)
        ("served again (same graphs: the determinism check)", all4, {}),
        ("with the L2 prefetch of the GEMV rows (SGLITE_GEMV_PREFETCH=1)", all4, dict(prefetch=True)),
        ("with the norm prologue (SGLITE_GEMV_NORM=1), 512 cols, 8 warps", all4, dict(norm=True)),
        ("with the norm prologue, 512 cols, 4 warps", all4, dict(norm=True, norm_tiles=dict(block_k=512, num_warps=4))),
        ("with the norm prologue, 256 cols, 4 warps", all4, dict(norm=True, norm_tiles=dict(block_k=256, num_warps=4))),
        ("with the norm prologue and the L2 prefetch", all4, dict(norm=True, prefetch=True)),
        ("no rotary epilogue (qkv GEMV, then the rotary + KV store kernel)", all4, dict(rope=False)),
        ("no GLU epilogue (gate_up GEMV, then the GeGLU kernel)", all4, dict(glu=False)),
        ("decode attention does not launch the o GEMV early", all4, dict(attn_early=False)),
        ("none of the sixth session's changes (the fifth session's default)", all4,
         dict(rope=False, glu=False, attn_early=False)),
        ("cuBLAS projections, no chained launch (SGLITE_GEMV=0)", (), {}),
    ]


def rope_check(runner, row, prompt, ctx, steps: int = 3) -> None:
    """Where the rotary epilogue (gemv_pairs.gemv_rope) parts from the two launches it replaces
    (qkv GEMV, then rotary + KV store): bench/gemv_pairs_check.py finds the kernel alone
    bit-equal at these shapes, the graphs' logits are not (0.109). First eagerly (no graph) on
    the same state and tokens, each layer's decode-attention inputs (q, k, v), attention output
    and layer outputs (x, residual) of both paths compared in launch order: the first that
    differs. Then graphs: served, gemv_rope without the early launch of attention, and the two
    launches, each against the served graph on the same fed tokens."""
    import functools

    from sglite.kernels import gemv_pairs

    backend, layers = runner.attn_backend, runner.model.model.layers
    rec: list = []
    real_forward = backend.forward

    def forward(q, k, v, *a, **kw):
        rec.append(("q, k, v into attention", tuple(t.clone() for t in (q, k, v) if t is not None)))
        out = real_forward(q, k, v, *a, **kw)
        rec.append(("attention output", (out.clone(),)))
        return out

    def hook(mod, args, out):
        rec.append(("layer output (x, residual)", tuple(t.clone() for t in out)))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    backend.forward = forward
    runner.token_pool.reset()
    loc = runner.token_pool.alloc(len(prompt))
    last = runner.forward(runner.make_extend_batch([row], [0], [prompt], loc)).argmax(-1).tolist()
    seq = len(prompt)
    try:
        for step in range(steps):
            seq += 1
            slot = runner.token_pool.alloc(1)
            runs = []
            for rope in (True, False):
                gemv_pairs.ROPE = rope
                rec.clear()
                logits = runner.forward_decode([row], [seq], last, slot, use_cuda_graph=False)[0].float().clone()
                runs.append((logits, list(rec)))
            gemv_pairs.ROPE = True
            (la, ra), (lb, rb) = runs
            first = None
            for i, ((name, ta), (_, tb)) in enumerate(zip(ra, rb)):
                bad = [j for j, (a, b) in enumerate(zip(ta, tb)) if not torch.equal(a, b)]
                if bad:
                    j = bad[0]
                    d = (ta[j].float() - tb[j].float()).abs()
                    first = (f"record {i} of {len(ra)} ({name}, tensor {j}, layer ~{i // 3}): "
                             f"{int((d > 0).sum())} of {d.numel()} differ, max {d.max().item():.3g}")
                    break
            print(f"rope check, eager step {step}: logits max |diff| {(la - lb).abs().max().item():.3g}, "
                  f"same argmax {bool(la.argmax() == lb.argmax())}, records {len(ra)} / {len(rb)}; "
                  f"first difference: {first or 'none (bit-equal)'}", flush=True)
            last = la.argmax(-1).reshape(-1).tolist()
    finally:
        backend.forward = real_forward
        for h in handles:
            h.remove()
        gemv_pairs.ROPE = True
    if runner.graph_runner is None:
        return
    served_ctx = runner.max_context_len
    real_rope = gemv_pairs.gemv_rope
    base, fed = graph_trace(runner, row, prompt)
    for name, rope, fn in (("gemv_rope, attention not launched early", True,
                            functools.partial(real_rope, early=False)),
                           ("qkv GEMV then rotary + KV store", False, real_rope)):
        try:
            gemv_pairs.ROPE, gemv_pairs.gemv_rope = rope, fn
            recapture(runner, served_ctx)
            logits, _ = graph_trace(runner, row, prompt, fed)
            d = (logits - base).abs()
            print(f"rope check, graphs: {name} vs served: max |logit diff| {d.max().item():.3g}, first step "
                  f"that differs {next((i for i in range(len(fed)) if d[i].max() > 0), None)}", flush=True)
        finally:
            gemv_pairs.ROPE, gemv_pairs.gemv_rope = True, real_rope
    recapture(runner, ctx or served_ctx)


@torch.inference_mode()
def attn_sweep(runner) -> None:
    """Decode attention alone at the model's head shape (graphs of 20 calls over one random bf16
    pool; splits as a graph captured for the model's context has them): the d256 tiles at bs 1
    over 256-8192 keys and at bs 32 x 2048 (1 split), us a call."""
    from sglite.kernels.decode_attention import decode_attention_fwd
    from sglite.kernels.decode_policy import decode_num_splits

    cfg, dev = runner.model_config, runner.device
    heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    props = torch.cuda.get_device_properties(dev)
    tiles = [dict(BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_N=16, num_warps=4, num_stages=2),
             dict(BLOCK_N=16, num_warps=2, num_stages=2), dict(BLOCK_N=64, num_warps=8, num_stages=2)]
    print("## decode attention alone (us a call; d256 tiles BLOCK_N x warps x stages)")
    print("| bs x keys (splits) | " + " | ".join("{BLOCK_N}x{num_warps}x{num_stages}".format(**t) for t in tiles) + " |")
    for bs, kv in ((1, 256), (1, 1024), (1, 4096), (1, 8192), (32, 2048)):
        splits = decode_num_splits(bs, kv_heads, num_sms=props.multi_processor_count,
                                   max_kv_len=runner.max_context_len)
        if bs > 1:
            splits = decode_num_splits(bs, kv_heads, num_sms=props.multi_processor_count, max_kv_len=kv)
        g = torch.Generator(device=dev).manual_seed(bs * kv)
        k_buf = torch.randn(bs * kv + 1, kv_heads, d, device=dev, dtype=torch.bfloat16, generator=g)
        v_buf = torch.randn(bs * kv + 1, kv_heads, d, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(bs, heads, d, device=dev, dtype=torch.bfloat16, generator=g)
        table = (1 + torch.randperm(bs * kv, device=dev, generator=g)).view(bs, kv).to(torch.int32)
        rows = torch.arange(bs, device=dev)
        lens = torch.full((bs,), kv, device=dev, dtype=torch.int32)
        mid_o = torch.empty(bs, heads, splits, d, device=dev, dtype=torch.float32)
        mid_lse = torch.empty(bs, heads, splits, device=dev, dtype=torch.float32)
        cells, ref = [], None
        for t in tiles:
            out = torch.empty_like(q)

            def call():
                decode_attention_fwd(q, k_buf, v_buf, out, table, rows, lens, scale=cfg.attention_scale, num_splits=splits,
                                     logit_cap=cfg.attn_logit_softcapping, mid_o=mid_o, mid_lse=mid_lse,
                                     tiles=dict(t, merge="fused"))
            try:
                call()
                sync(dev)
                ref = out.clone() if ref is None else ref
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        call()
                graph.replay()
                sync(dev)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                sync(dev)
                cells.append(f"{start.elapsed_time(end) * 1e3 / 200:.2f}{' ERR %.1e' % err if err > 1e-2 else ''}")
                del graph
            except Exception as e:  # noqa: BLE001
                cells.append(f"failed {type(e).__name__}")
        print(f"| {bs} x {kv} ({splits}) | " + " | ".join(cells) + " |", flush=True)


@torch.inference_mode()
def gemv_sweep(runner) -> dict:
    """Each decoder projection alone, its 42 (num_layers) weights one after another in a CUDA
    graph (each read once per replay, past the L2): cuBLAS F.linear vs the one-row GEMV tiles."""
    import torch.nn.functional as F

    from sglite.kernels.gemv import gemv

    layers = runner.model.model.layers
    shapes = {
        "qkv": [l.self_attn.qkv_proj.weight for l in layers],
        "o": [l.self_attn.o_proj.weight for l in layers],
        "gate_up": [l.mlp.gate_up_proj.weight for l in layers],
        "down": [l.mlp.down_proj.weight for l in layers],
    }
    configs = [None, dict(BLOCK_N=4, BLOCK_K=512, num_warps=4), dict(BLOCK_N=8, BLOCK_K=512, num_warps=8),
               dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4), dict(BLOCK_N=2, BLOCK_K=512, num_warps=4),
               dict(BLOCK_N=1, BLOCK_K=1024, num_warps=4), dict(BLOCK_N=2, BLOCK_K=2048, num_warps=8)]
    best = {}
    print("## one-row projections alone (us a call, TB/s of weights; graph of one call per layer)")
    print("| shape | " + " | ".join("cuBLAS" if c is None else "{BLOCK_N}x{BLOCK_K} w{num_warps}".format(**c)
                                    for c in configs) + " |")
    for name, ws in shapes.items():
        n, k = ws[0].shape
        x = torch.randn(1, k, device=runner.device, dtype=ws[0].dtype)
        outs = torch.empty(len(ws), 1, n, device=runner.device, dtype=ws[0].dtype)
        ref = F.linear(x.float(), ws[0].float())
        cells = []
        for cfg in configs:
            try:
                def run():
                    for i, w in enumerate(ws):
                        if cfg is None:  # F.linear's kernel, into the buffer
                            torch.mm(x, w.t(), out=outs[i])
                        else:
                            gemv(x, w, config=dict(cfg, num_stages=1), out=outs[i])
                run()
                err = ((outs[0].float() - ref).norm() / ref.norm()).item()
                sync(runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                graph.replay()
                sync(runner.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                sync(runner.device)
                us = start.elapsed_time(end) * 1e3 / (10 * len(ws))
                tbs = ws[0].numel() * ws[0].element_size() / (us * 1e-6) / 1e12
                cells.append(f"{us:.1f} ({tbs:.2f}){' ERR %.0e' % err if err > 1e-2 else ''}")
                if cfg is not None and err <= 1e-2 and us < best.get((n, k), (float("inf"),))[0]:
                    best[(n, k)] = (us, dict(cfg, num_stages=1))
                del graph
            except Exception as e:  # noqa: BLE001
                cells.append(f"failed {type(e).__name__}")
        print(f"| {name} {n}x{k} | " + " | ".join(cells) + " |", flush=True)
    print(f"GEMV tiles for the variants: {best}", flush=True)
    return {shape: cfg for shape, (_, cfg) in best.items()}


def profile_step(args, runner, row, seq, last):
    """Where the step's GPU time goes: eager forwards (kernels by GPU time; ops by input shape,
    so that each linear's kernel time is told apart), then graph replays (the kernels as the
    measured step runs them). --trace-dir writes the replays' chrome trace for the gaps."""
    from torch.profiler import ProfilerActivity, profile

    device = runner.device
    kind = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    sort = f"{device.type}_time_total"
    with profile(activities=[kind], record_shapes=True) as prof:
        for i in range(3):
            batch = runner.make_decode_batch([row], [seq + i], last, runner.token_pool.alloc(1))
            runner.forward(batch, use_cuda_graph=False)
        sync(device)
    print("## eager forward x3: kernels by GPU time")
    print(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
    print("## eager forward x3: ops by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30,
                                                             max_name_column_width=40,
                                                             max_shapes_column_width=70))
    if runner.graph_runner is None:
        return
    graph = runner.graph_runner.graphs[1]
    for _ in range(3):
        graph.replay()
    sync(device)
    with profile(activities=[kind]) as prof:
        for _ in range(5):
            graph.replay()
        sync(device)
    print("## graph replay x5: kernels by GPU time")
    print(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
    trace_dir = args.trace_dir or tempfile.mkdtemp()
    os.makedirs(trace_dir, exist_ok=True)
    trace = os.path.join(trace_dir, f"{args.config}_replay_trace.json")
    prof.export_chrome_trace(trace)
    critical_path(trace, replays=5)


def critical_path(trace_file: str, replays: int) -> None:
    """Each kernel's share of the replayed step's critical path, from a chrome trace: kernels in
    start order, a kernel's share the time by which it moves the latest end seen so far (with
    PDL a kernel starts before its predecessor ends; only what it adds past that end counts),
    and the idle time before a kernel that starts after every earlier one has ended. The shares
    and idle times sum to the replays' span: what a step costs, kernel by kernel."""
    events = [e for e in json.load(open(trace_file))["traceEvents"]
              if e.get("cat") == "kernel" and e.get("ph") == "X"]
    events.sort(key=lambda e: e["ts"])
    shares: dict[str, list[float]] = {}
    last_end = None
    for e in events:
        start, end = e["ts"], e["ts"] + e["dur"]
        name = e["name"].split("(")[0][:60]
        entry = shares.setdefault(name, [0, 0.0, 0.0, 0.0])  # calls, own time, share, idle before
        entry[0] += 1
        entry[1] += e["dur"]
        if last_end is not None and start > last_end:
            entry[3] += start - last_end
        if last_end is None or end > last_end:
            entry[2] += end - (last_end if last_end is not None and start < last_end else start)
            last_end = end
    span = (last_end - events[0]["ts"]) / replays if events else 0.0
    print(f"## graph replay critical path: {span:.1f} us a replay (first kernel's start to last end)")
    print("| kernel | calls a replay | own us a call | share us a replay | idle before us a replay |")
    print("| --- | --- | --- | --- | --- |")
    for name, (calls, own, share, idle) in sorted(shares.items(), key=lambda kv: -kv[1][2]):
        print(f"| {name} | {calls / replays:.0f} | {own / calls:.2f} | {share / replays:.1f} | {idle / replays:.1f} |")


def bench_hf(args, hf_dict, device, prompt, attn: str) -> tuple[float, str]:
    import transformers

    config = transformers.AutoConfig.for_model(hf_dict["model_type"], **{
        k: v for k, v in hf_dict.items() if k not in ("model_type", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                              attn_implementation=attn).eval()
    impl = getattr(model.config, "_attn_implementation", "?")
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def gen(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        sync(device)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - t0

    gen(4)  # warm-up
    one = min(gen(1) for _ in range(2))
    full = gen(1 + args.hf_steps)
    del model
    return (full - one) / args.hf_steps, f"transformers {transformers.__version__}, attn {impl}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="gemma2-9b", choices=list(CONFIGS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hf-steps", type=int, default=48)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the decode step's kernels by GPU time")
    ap.add_argument("--max-context", default=None,
                    help="context limit the graphs are captured for: the model's (default, as "
                         "served), a number, or 'pool' (this benchmark's small pool)")
    ap.add_argument("--variants", action="store_true",
                    help="also time each batch-1 fusion / early launch off, all off, and cuBLAS projections")
    ap.add_argument("--variant-set", default="eighth", choices=("eighth", "eighth-tiles", "seventh", "ninth", "tenth"),
                    help="--variants: the eighth session's cases (eighth-tiles: decode attention's only), the "
                         "seventh session's, the ninth's (decode attention's early tile off and on), or the tenth's "
                         "(tiles of the GEMVs, norms and attention in the chain)")
    ap.add_argument("--attn-sweep", action="store_true",
                    help="decode attention alone at the model's head shape: d256 tiles at bs 1 x 256-8192 and bs 32")
    ap.add_argument("--check-only", action="store_true",
                    help="only the served-path checks against eager launches, no timing")
    ap.add_argument("--rope-check", action="store_true",
                    help="where the rotary epilogue's logits part from the two-launch path (eager per layer, graphs)")
    ap.add_argument("--scheduler", action="store_true",
                    help="also time the decode through the Scheduler (as served: overlapped loop)")
    ap.add_argument("--gemv-sweep", action="store_true", help="time each projection alone: cuBLAS vs GEMV tiles")
    ap.add_argument("--trace-dir", default=None, help="--profile: write the replays' chrome trace here")
    ap.add_argument("--hf-attn", default="eager,sdpa",
                    help="transformers attention implementations to time (Gemma 2's soft-capping "
                         "is computed by eager only)")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args()
    device = torch.device(args.device)
    hf_dict = CONFIGS[args.config]
    folder = tempfile.mkdtemp(prefix=f"{args.config}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_dict, f)
    prompt = torch.randint(3, hf_dict["vocab_size"], (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    copy_bw = copy_bandwidth(device)
    weight_bytes, step_s, replay_s, kv_bytes, cfg, variants, sched_s, check = bench_sglite(
        args, folder, device, prompt)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    copy_bw_after = copy_bandwidth(device)  # the floor's spread within the call
    copy_bw_events = copy_bandwidth_events(device)
    floor = weight_bytes / copy_bw
    hf = []
    for attn in [] if args.skip_hf else args.hf_attn.split(","):
        try:
            hf.append(bench_hf(args, hf_dict, device, prompt, attn))
        except Exception as e:  # the sglite numbers still print
            print(f"transformers ({attn}) failed: {type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = [("sglite bs1 decode ms/token (runner's whole step)", [s * 1e3 for s in step_s],
             [floor / s for s in step_s])]
    if sched_s:
        rows.append(("sglite bs1 decode through the Scheduler (as served, overlapped loop) ms/token",
                     [s * 1e3 for s in sched_s], [floor / s for s in sched_s]))
    if replay_s is not None:
        rows.append(("sglite graph replay alone ms/token", [replay_s * 1e3], [floor / replay_s]))
    for v_name, v_step, v_replay in variants:
        label = "whole step x2, scheduler x2; replay" if len(v_step) == 4 else "whole step x2; replay"
        rows.append((f"variant {v_name}: {label}", [s * 1e3 for s in v_step] + [v_replay * 1e3],
                     [floor / s for s in v_step] + [floor / v_replay]))
    for hf_s, hf_note in hf:
        rows.append((f"transformers generate bs1 ms/token ({hf_note})", [hf_s * 1e3], [floor / hf_s]))
    print(f"\n{args.config} on {name}: {weight_bytes / 1e9:.2f} GB of weights, copy {copy_bw / 1e9:.0f} GB/s "
          f"-> weight floor {floor * 1e3:.3f} ms/token (copy after the runs {copy_bw_after / 1e9:.0f} GB/s: "
          f"floor {weight_bytes / copy_bw_after * 1e3:.3f}; timed with events "
          f"{(copy_bw_events or 0) / 1e9:.0f} GB/s: floor {weight_bytes / (copy_bw_events or copy_bw) * 1e3:.3f}); KV {kv_bytes / 1e3:.0f} KB/token "
          f"({cfg.num_layers} layers, window {cfg.sliding_window} on "
          f"{sum(cfg.window_for_layer(i) is not None for i in range(cfg.num_layers))}); "
          f"prompt {args.prompt_len}, {args.steps} steps")
    print("| case | ms/token | floor / time |")
    print("| --- | --- | --- |")
    for case, ms, ratio in rows:
        print(f"| {case} | {' / '.join(f'{m:.3f}' for m in ms)} | {' / '.join(f'{r:.3f}' for r in ratio)} |")
    for hf_s, hf_note in hf:
        print(f"sglite vs transformers ({hf_note}): {hf_s / min(step_s):.1f}x")
    print(f"served path vs eager cuBLAS (logits, {check['steps']} steps): max rel err "
          f"{check['max_rel_err']:.2e}, same argmax {check['same_top1']}/{check['steps']}; vs the same "
          f"kernels launched eagerly: {check['max_rel_err_vs_eager_same_kernels']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=args.config, device=name, weight_bytes=weight_bytes, copy_bw=copy_bw,
                           copy_bw_after=copy_bw_after, copy_bw_events=copy_bw_events,
                           floor_s=floor, step_s=step_s, replay_s=replay_s, hf=hf, variants=variants,
                           scheduler_s=sched_s, check=check), f)


if __name__ == "__main__":
    main()
