"""Host time of filling the grammar masks of a JSON-schema batch, step by step, by xgrammar's thread
count (issue 15: on an H200 host the first decode of 256 JSON gens charged 0.2 s to the mask fill,
where the steady steps take a few ms). The matchers walk the schema of bench/structured.py from the
text a jump-forward prefills (`{"name": "`), one random allowed token a step (seeded), like the
benchmark's greedy gens on random weights. The baseline beside each row: the same fill through one
thread.

    python bench/grammar_fill_threads.py --model .benchmodel     # any machine; the folder's tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import xgrammar as xgr
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.structured import REGEX, SCHEMA  # noqa: E402
from sglite.runtime.sampling.constrained import GrammarCache, allocate_bitmask, bitmask_to_bool  # noqa: E402
from sglite.runtime.sampling.constrained.state import _Filler  # noqa: E402


def walk(grammar, vocab: int, fill, bs: int, steps: int, seed: int, prefix: list[int] = ()) -> list[float]:
    """Seconds of each step's fill for bs fresh matchers of the compiled xgrammar `grammar`, each
    having taken the token ids `prefix`, then one random allowed token a step (seeded).
    fill(matchers, bitmask, rows): an xgrammar BatchGrammarMatcher's batch_fill_next_token_bitmask,
    or the runtime's _Filler.fill, which shares the rows among Python threads."""
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(bs)]
    for m in matchers:
        assert all(m.accept_token(t) for t in prefix)
    bitmask = allocate_bitmask(bs, vocab)
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        rows = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not rows:
            break
        t = time.perf_counter()
        fill([matchers[i] for i in rows], bitmask, rows)
        times.append(time.perf_counter() - t)
        scores = torch.rand(bs, vocab, generator=gen).masked_fill_(~bitmask_to_bool(bitmask, vocab), -1.0)
        ids = scores.argmax(-1).tolist()
        for i in rows:
            assert matchers[i].accept_token(ids[i])
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a folder with a tokenizer and config.json")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--threads", default="1,8,auto,split2,split4",
                    help="xgrammar thread counts, or splitN: the runtime's rows over N Python threads")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    cache = GrammarCache(tokenizer, vocab)
    workloads = {"json": (cache.get_future("json_schema", json.dumps(SCHEMA)).result(), '{"name": "'),
                 "regex": (cache.get_future("regex", REGEX).result(), "(")}
    print(f"host: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)")
    print("| grammar | batch | threads | first fill ms | 2nd | 3rd | steady ms (median of the rest) | "
          "longest ms | total ms | 1 thread total ms | speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (compiled, prefix_text) in workloads.items():
        prefix = tokenizer.encode(prefix_text, add_special_tokens=False)
        for bs in [int(b) for b in args.batches.split(",")]:
            base = None
            for threads in args.threads.split(","):
                if threads.startswith("split"):  # the runtime's fill: rows shared among Python threads
                    fill = _Filler(int(threads[5:])).fill
                else:
                    fill = xgr.BatchGrammarMatcher(
                        max_threads=threads if threads == "auto" else int(threads)).batch_fill_next_token_bitmask
                walk(compiled.xgr_grammar, vocab, fill, 8, 3, seed=1, prefix=prefix)  # threads started
                times = walk(compiled.xgr_grammar, vocab, fill, bs, args.steps, seed=0, prefix=prefix)
                rest = sorted(times[3:]) or [0.0]
                total = sum(times)
                base = total if base is None else base
                print(f"| {name} | {bs} | {threads} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | "
                      f"{times[2] * 1e3:.2f} | {rest[len(rest) // 2] * 1e3:.2f} | {max(times) * 1e3:.1f} | "
                      f"{total * 1e3:.1f} | {base * 1e3:.1f} | {base / total:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
