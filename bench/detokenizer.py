"""Incremental detokenization per token: the Rust DecodeStream path beside the Python window path
(runtime/sampling/detokenizer.py), same tokens, same run, on the embedded model's tokenizer.

    .venv/bin/python bench/detokenizer.py [--tokens 4000]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from sglite.runtime.models.loader import load_tokenizer, resolve_model
from sglite.runtime.sampling.detokenizer import IncrementalDetokenizer


def per_token_us(tokenizer, prompt, ids, *, fast: bool) -> float:
    d = IncrementalDetokenizer(tokenizer, prompt)
    if not fast:
        d._stream = None
    t0 = time.perf_counter()
    for t in ids:
        d.append(t)
    d.flush()
    return (time.perf_counter() - t0) / len(ids) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4000)
    args = ap.parse_args()
    tok = load_tokenizer(resolve_model(None))
    text = open(__file__).read() * 4
    ids = tok.encode(text, add_special_tokens=False)[: args.tokens]
    rng = random.Random(0)
    ids = [t if rng.random() > 0.05 else rng.randrange(len(tok)) for t in ids]  # some odd bytes
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    per_token_us(tok, prompt, ids[:200], fast=True), per_token_us(tok, prompt, ids[:200], fast=False)
    fast = min(per_token_us(tok, prompt, ids, fast=True) for _ in range(3))
    slow = min(per_token_us(tok, prompt, ids, fast=False) for _ in range(3))
    print(f"\n| CPU ({platform.processor() or platform.machine()}), {len(ids)} tokens | us per token |\n|---|---|")
    print(f"| Rust DecodeStream | {fast:.1f} |\n| Python window decodes (baseline) | {slow:.1f} |")
    print(f"| ratio | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
