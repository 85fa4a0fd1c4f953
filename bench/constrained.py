"""Constrained decoding overhead per decode step, CPU, SmolLM2's 49152-token vocabulary.

For a batch of 1 and 16 requests (every row constrained by a JSON schema, at different points of
their outputs), times one step's grammar work: fill the token bitmask, apply it to the logits,
accept the sampled tokens, look for a jump-forward string. Beside it, in the same run, the
unconstrained step's sampling cost (sglite.runtime.sampling.sampler at temperature 1, the baseline), and the
ratio. Also: the bool-mask path (bitmask_to_bool, for samplers that take allowed_mask).

    .venv/bin/python bench/constrained.py [--iters 200]
    .venv/bin/python bench/constrained.py --e2e [--rounds 3] [--num-threads 1]

`--e2e` starts two runtimes on the embedded model (jump-forward on, and off) and measures
end-to-end tokens/s of greedy JSON-schema generations on each, with unconstrained generations of
the same length beside them (see `e2e`).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import numpy as np
import torch

from sglite.runtime.sampling.constrained import (
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
    from sglite.runtime.models.loader import load_tokenizer as load, resolve_model

    return load(resolve_model(None))  # the runtime's own tokenizer (embedded model)


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
    from sglite.runtime.sampling.sampler import SamplingBatch

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


E2E_SCHEMA = {  # bounded (maxLength, maxItems, min/max), so every generation completes
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}


def _generate_batch(sock, params: dict, batch_size: int, offset: int) -> dict:
    """batch_size concurrent greedy requests → wall time, output tokens, jumped tokens, #valid."""
    from sglite.protocol import ErrorOut, GenerateReq, decode_reply, encode

    rids = [f"b{offset + i}-{time.monotonic_ns()}" for i in range(batch_size)]
    t = time.perf_counter()
    for i, rid in enumerate(rids):
        text = f"A JSON record of employee number {offset + i}:\n"
        sock.send(encode(GenerateReq(rid=rid, text=text, sampling_params=params)))
    texts, metas = {rid: "" for rid in rids}, {}
    while len(metas) < batch_size:
        reply = decode_reply(sock.recv())
        if isinstance(reply, ErrorOut):
            raise RuntimeError(f"runtime error: {reply.message}")
        texts[reply.rid] += reply.text
        if reply.finished:
            metas[reply.rid] = reply.meta_info
    seconds = time.perf_counter() - t
    valid = 0
    for text in texts.values():
        try:
            valid += set(json.loads(text)) == set(E2E_SCHEMA["required"])
        except ValueError:
            pass
    return {"seconds": seconds, "tokens": sum(m["completion_tokens"] for m in metas.values()),
            "jumped": sum(m.get("jump_forward_tokens", 0) for m in metas.values()),
            "valid": valid}


def e2e(*, batch_sizes=(1, 8), rounds: int = 3, num_threads: int | None = None) -> list[tuple]:
    """JSON-schema generations with jump-forward on (one runtime) vs off (a second runtime started
    with --disable-jump-forward) vs unconstrained (the first runtime, ignore_eos, as many tokens
    as the JSON outputs had): tokens/s of the batch, best of `rounds` interleaved rounds (the
    machine is shared: the best round is the least disturbed one)."""
    import zmq

    from sglite.launch import RuntimeProcess

    kw = dict(log_interval=0) | ({"num_threads": num_threads} if num_threads else {})
    schema = {"temperature": 0, "max_new_tokens": 160, "json_schema": json.dumps(E2E_SCHEMA)}
    rows = []
    with RuntimeProcess(None, timeout=900, **kw) as on_rt, \
            RuntimeProcess(None, timeout=900, disable_jump_forward=True, **kw) as off_rt:
        on, off = (zmq.Context.instance().socket(zmq.DEALER) for _ in range(2))
        on.connect(on_rt.address)
        off.connect(off_rt.address)
        for c in (on, off):  # warm-up: grammar compile, first forwards
            _generate_batch(c, schema, 1, 0)
        for bs in batch_sizes:
            best: dict[str, dict] = {}
            for r in range(rounds):
                runs = {"json, jump-forward on": _generate_batch(on, schema, bs, 100 * r),
                        "json, jump-forward off": _generate_batch(off, schema, bs, 100 * r)}
                per_req = max(1, runs["json, jump-forward on"]["tokens"] // bs)
                free = {"temperature": 0, "max_new_tokens": per_req, "ignore_eos": True}
                runs["unconstrained"] = _generate_batch(on, free, bs, 100 * r)
                for label, m in runs.items():
                    m["tok_s"] = m["tokens"] / m["seconds"]
                    if label not in best or m["tok_s"] > best[label]["tok_s"]:
                        best[label] = m
            base = best["json, jump-forward off"]
            for label in ("unconstrained", "json, jump-forward off", "json, jump-forward on"):
                m = best[label]
                rows.append((bs, label, m["tokens"], m["jumped"], f"{m['valid']}/{bs}"
                             if label != "unconstrained" else "-", m["seconds"], m["tok_s"],
                             m["tok_s"] / base["tok_s"], base["seconds"] / m["seconds"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--e2e", action="store_true",
                    help="end to end: start two runtimes (jump-forward on / off) and compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads per runtime")
    args = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l),
               platform.processor())
    print(f"machine: {cpu}, torch threads {torch.get_num_threads()}, vocab {VOCAB}")
    if args.e2e:
        print(f"runtime torch threads: {args.num_threads or 'default'}, rounds {args.rounds}")
        print("| batch | run | output tokens | jumped | valid | seconds | tok/s "
              "| tok/s vs JF off | speed-up (time) vs JF off |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in e2e(rounds=args.rounds, num_threads=args.num_threads):
            print("| {} | {} | {} | {} | {} | {:.2f} | {:.1f} | {:.2f}x | {:.2f}x |".format(*r))
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
