"""xgrammar's batched mask fill for the JSON-schema bench's schema (bench/structured.py SCHEMA), in
one run: the bounded-string character rules compared (xgrammar's own, the one the grammar cache
compiles, and one that also admits escapes), and rows inside an open string vs a whole output.

    .venv/bin/python bench/grammar_fill.py [--rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.structured import SCHEMA  # noqa: E402
from sglite.runtime.models.loader import load_tokenizer, resolve_model  # noqa: E402
from sglite.runtime.sampling.constrained import GrammarCache, GrammarState, allocate_bitmask, bitmask_to_bool, fill_bitmask  # noqa: E402,E501
from sglite.runtime.sampling.constrained import grammar_cache as gc  # noqa: E402

ESCAPES = r'[^\0-\x1f\"\\] | "\\" ([\"\\/bfnrt] | "u" [A-Fa-f0-9]{4})'


def walk_ms(compiled, rows: int, steps: int) -> float:
    """Mean fill time per step while every row walks a random allowed path (greedy on noise)."""
    states = [GrammarState(compiled) for _ in range(rows)]
    bm = allocate_bitmask(rows, compiled.vocab_size)
    gen = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    for _ in range(steps):
        t0 = time.perf_counter()
        live = fill_bitmask(bm, states)
        total += time.perf_counter() - t0
        if not live:
            break
        allowed = bitmask_to_bool(bm[:rows], compiled.vocab_size)
        ids = torch.randn(rows, compiled.vocab_size, generator=gen).masked_fill(~allowed, -1e9).argmax(-1)
        for i in live:
            states[i].accept(int(ids[i]))
        n += 1
    return total / max(n, 1) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    tok = load_tokenizer(resolve_model(None))
    schema = json.dumps(SCHEMA)
    rules = {"xgrammar's own bounded strings": lambda e: e,
             "the cache's (control characters excluded)": gc._strict_json_strings,
             "also admitting escapes": lambda e: e.replace(gc._BOUNDED_CHAR, ESCAPES)}
    print(f"| {args.rows} rows, {os.cpu_count()} CPUs | fill ms per step |\n|---|---|")
    for name, rule in rules.items():
        saved, gc._strict_json_strings = gc._strict_json_strings, rule
        cache = GrammarCache(tok, 49152, stop_token_ids=[2])
        try:
            compiled = cache.compile("json_schema", schema)
        finally:
            cache.shutdown()
            gc._strict_json_strings = saved
        print(f"| {name}, random walk | {walk_ms(compiled, args.rows, args.steps):.2f} |", flush=True)
        if rule is gc._strict_json_strings:
            states = [GrammarState(compiled) for _ in range(args.rows)]
            for s in states:
                assert s.accept_many(tok.encode('{"name": "', add_special_tokens=False))
            bm = allocate_bitmask(args.rows, 49152)
            t0 = time.perf_counter()
            for _ in range(10):
                fill_bitmask(bm, states)
            ms = (time.perf_counter() - t0) / 10 * 1e3
            print(f"| {name}, every row inside the open name string | {ms:.2f} "
                  f"({ms / args.rows * 1e3:.0f} us a row) |", flush=True)


if __name__ == "__main__":
    main()
