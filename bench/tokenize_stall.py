"""How long one long prompt's tokenization stalls the streams that are already decoding.

One streamed gen decodes on the embedded model while a second client sends a GenerateReq with a
long text (by default a text past the context length in tokens but under the characters limit:
tokenized, then refused, so that the stall is the tokenization alone and no prefill follows).
Prints the stream's gaps between tokens: the longest in the second after the long prompt went out,
beside the same stream's median gap and the longest gap of a stream with no long prompt (same run,
same runtime). The long text's tokenization time in this process is printed beside.

    .venv/bin/python bench/tokenize_stall.py [--chars 120000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

from sglite.engine import Engine, GenerateClient
from sglite.lang.backend.base import RuntimeRequestError
from sglite.lang.backend.client import ZmqClient

STREAM = {"temperature": 0, "max_new_tokens": 120, "ignore_eos": True}


def long_text(chars: int) -> str:
    words = " ".join(str(i % 997) for i in range(chars // 3))  # short tokens: many per character
    return words[:chars]


def stream_gaps(llm: Engine, send=None, *, after: int = 30):
    """Gaps (s) between the stream's chunks; send(): called from a thread after `after` chunks.
    Returns the gaps, the time send() started (perf_counter, or None) and the chunks' times."""
    stamps, sent = [], [None]
    for chunk in llm.generate("List the numbers from one to two hundred:", STREAM, stream=True):
        stamps.append(time.perf_counter())
        if send is not None and len(stamps) == after:
            sent[0] = time.perf_counter()
            threading.Thread(target=send, daemon=True).start()
    return [b - a for a, b in zip(stamps, stamps[1:])], sent[0], stamps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=120000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-threads", type=int, default=None, help="the runtime's torch CPU threads")
    args = ap.parse_args()
    text = long_text(args.chars)
    kw = {} if args.num_threads is None else {"num_threads": args.num_threads}
    with Engine(device="cpu", **kw) as llm:
        tok = None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(llm.server_info["model_path"])
        except Exception:
            pass
        other = GenerateClient(ZmqClient(llm.process.address))
        replies = []

        def send():
            t = time.perf_counter()
            try:
                other.generate(text, {"max_new_tokens": 1})
                replies.append(("ok", time.perf_counter() - t))
            except RuntimeRequestError as e:
                replies.append((str(e)[:90], time.perf_counter() - t))

        stream_gaps(llm)  # warm
        rows = []
        for _ in range(args.rounds):
            plain, _, _ = stream_gaps(llm)
            gaps, sent, stamps = stream_gaps(llm, send)
            near = [g for g, s in zip(gaps, stamps[1:]) if sent <= s <= sent + 1.0]
            rows.append((statistics.median(gaps), max(near), max(plain)))
        tok_ms = None
        if tok is not None:
            t = time.perf_counter()
            n = len(tok(text).input_ids)
            tok_ms = (time.perf_counter() - t) * 1e3
        print(f"host: {platform.processor() or platform.machine()}, the long text: {len(text)} chars"
              + (f", {n} tokens, tokenized here in {tok_ms:.0f} ms" if tok_ms else "")
              + f"; its reply: {replies[-1][0]!r} after {replies[-1][1] * 1e3:.0f} ms")
        print("| round | stream's median gap ms | longest gap within 1 s of the long prompt ms | "
              "longest gap, no long prompt ms |\n|---|---|---|---|")
        for i, (med, near, plain) in enumerate(rows):
            print(f"| {i} | {med * 1e3:.1f} | {near * 1e3:.1f} | {plain * 1e3:.1f} |")
        other.client.close()


if __name__ == "__main__":
    main()
