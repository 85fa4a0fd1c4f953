"""CPU executor benchmark: sglite's ModelRunner beside transformers on the same converted weights.

Load time (first start = GGUF conversion, then cached), prefill tokens/s and decode tokens/s at
batch 1 and 8, both in the same process and dtype. Usage:
    .venv/bin/python bench/cpu_executor.py [--dtype bfloat16] [--prompt-len 512] [--decode-steps 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sglite_prefill(runner, bs, prompt_len):
    rows = [runner.req_to_token.alloc() for _ in range(bs)]
    ids = [[(7 * i + j) % 1000 + 100 for j in range(prompt_len)] for i in range(bs)]
    loc = runner.token_pool.alloc(bs * prompt_len)
    logits = runner.forward(runner.make_extend_batch(rows, [0] * bs, ids, loc))
    return rows, logits


def sglite_decode(runner, rows, prompt_len, steps):
    next_ids = [5] * len(rows)
    for step in range(steps):
        seq_lens = [prompt_len + step + 1] * len(rows)
        loc = runner.token_pool.alloc(len(rows))
        next_ids = runner.forward(runner.make_decode_batch(rows, seq_lens, next_ids, loc)).argmax(-1).tolist()


def release(runner, rows):
    for row in rows:
        runner.token_pool.free(runner.req_to_token.read(row, 0, runner.max_context_len).unique()[1:])
        runner.req_to_token.table[row].zero_()
        runner.req_to_token.free(row)


def bench_sglite(runner, bs, prompt_len, steps):
    release(runner, sglite_prefill(runner, bs, prompt_len)[0])  # warm-up (oneDNN, allocator)
    prefill_s, (rows, _) = timed(lambda: sglite_prefill(runner, bs, prompt_len))
    decode_s, _ = timed(lambda: sglite_decode(runner, rows, prompt_len, steps))
    release(runner, rows)
    return bs * prompt_len / prefill_s, bs * steps / decode_s


@torch.inference_mode()
def bench_hf(model, bs, prompt_len, steps):
    ids = torch.tensor([[(7 * i + j) % 1000 + 100 for j in range(prompt_len)] for i in range(bs)])
    mask = torch.ones_like(ids)
    gen = dict(do_sample=False, attention_mask=mask, pad_token_id=0, eos_token_id=None)
    prefill_s, _ = timed(lambda: model(ids, attention_mask=mask, logits_to_keep=1), repeat=2)
    one_s, _ = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen))
    all_s, _ = timed(lambda: model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **gen))
    return bs * prompt_len / prefill_s, bs * steps / max(all_s - one_s, 1e-9)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from sglite.runtime.executor.model_runner import ModelRunner, resolve_dtype

    dtype = resolve_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as cache:  # fresh cache: the first load converts the GGUF
        os.environ["SGLITE_CACHE"] = cache
        first_s, _ = timed(lambda: ModelRunner(dtype=args.dtype, max_total_tokens=8192))
        cached_s, runner = timed(lambda: ModelRunner(dtype=args.dtype, max_total_tokens=8192))
        hf_load_s, hf = timed(lambda: AutoModelForCausalLM.from_pretrained(runner.model_path, dtype=dtype))
    hf.eval()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {dtype}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"load: sglite first start (GGUF conversion) {first_s:.2f} s, cached {cached_s:.2f} s; "
          f"transformers from_pretrained of the converted folder {hf_load_s:.2f} s")
    rows = []
    for bs, prompt_len in ((1, args.prompt_len), (8, args.prompt_len // 4)):
        sgl_prefill, sgl_decode = bench_sglite(runner, bs, prompt_len, args.decode_steps)
        hf_prefill, hf_decode = bench_hf(hf, bs, prompt_len, args.decode_steps)
        rows.append((bs, prompt_len, sgl_prefill, hf_prefill, sgl_decode, hf_decode))
    print("| batch | prompt | prefill tok/s sglite | transformers | ratio "
          "| decode tok/s sglite | transformers | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for bs, plen, sp, hp, sd, hd in rows:
        print(f"| {bs} | {plen} | {sp:.0f} | {hp:.0f} | {sp / hp:.2f}x | {sd:.1f} | {hd:.1f} | {sd / hd:.2f}x |")


if __name__ == "__main__":
    main()
