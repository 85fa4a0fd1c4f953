"""Structured generation beside plain generation on a GPU (issue 15), baselines in the same run.

A config-only folder (a real config.json + SmolLM2's tokenizer, vocab 49152) served with
load_format="dummy" runs text programs at the Llama-3-8B shape:

  select: N questions sharing a ~1100-token few-shot prefix, 4 choices of ~20 tokens each, all in
          flight at once (as run_batch sends them), radix cache on vs off; transformers one program
          at a time, one forward per choice (the prefix recomputed) on a subset;
  logprobs: B concurrent gens of 64 tokens with return_logprob + top 5 vs the same gens without, at
          B = 64 and B = 1.
  grammar:  256 concurrent JSON-schema gens (5 fields: a bounded string, an integer, an enum, a
          boolean, an array of enums) and 256 regex gens, each vs 256 unconstrained gens of the
          same lengths (max_new_tokens = each constrained output's length, ignore_eos); every
          output the grammar finished is validated; a half-constrained batch (128 JSON + 128
          plain) vs the same 128 plain beside 128 unconstrained: the plain half's tokens/s. Jump-
          forward is also measured off (server flag), for the record.

    python bench/make_bench_model.py .benchmodel      # on a machine with the embedded model
    python bench/structured.py --model .benchmodel    # H100/H200
    python bench/make_bench_model.py /tmp/bm2 --layers 2 && \\
        python bench/structured.py --model /tmp/bm2 --device cpu --num-select 8 --bs 4 --hf-programs 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import uuid

import torch
import zmq

from sglite import protocol
from sglite.launch import RuntimeProcess, wait_reply

WORDS = ("alpha beta gamma delta river mountain city ocean forest planet engine signal number "
         "theory market garden window silver yellow quiet rapid ancient modern").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def select_workload(rng, num_questions):
    shots = "".join(f"Q: {sentence(rng, 25)}?\nA: {sentence(rng, 25)}.\n\n" for _ in range(20))
    questions = [f"{shots}Q: {sentence(rng, 12)}?\nA:" for _ in range(num_questions)]
    choices = [[" " + sentence(rng, 18) for _ in range(4)] for _ in range(num_questions)]
    return questions, choices


class Client:
    def __init__(self, rt):
        self.rt = rt
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(rt.address)

    def run_all(self, msgs) -> list:
        for m in msgs:
            self.sock.send(protocol.encode(m))
        out = {}
        while len(out) < len(msgs):
            r = wait_reply(self.sock, alive=self.rt.is_alive, timeout=900, describe=self.rt.log_tail)
            if isinstance(r, protocol.ErrorOut):
                raise RuntimeError(r.message)
            if getattr(r, "finished", True):
                out[r.rid] = r
        return [out[m.rid] for m in msgs]

    def info(self) -> dict:
        return self.run_all([protocol.InfoReq(rid=f"info-{uuid.uuid4().hex[:6]}")])[0].info


def rid():
    return uuid.uuid4().hex[:10]


def bench_select(args, server_args, radix: bool, questions, choices):
    with RuntimeProcess(args.model, timeout=900, disable_radix_cache=not radix, **server_args) as rt:
        c = Client(rt)
        warm_q, warm_c = select_workload(random.Random(1), 4)  # another prefix: compiles, no hits
        c.run_all([protocol.ScoreReq(rid=rid(), text=q, choices=ch) for q, ch in zip(warm_q, warm_c)])
        before = c.info()
        t0 = time.perf_counter()
        outs = c.run_all([protocol.ScoreReq(rid=rid(), text=q, choices=ch) for q, ch in zip(questions, choices)])
        dt = time.perf_counter() - t0
        after = c.info()
    ctr = {k: round(after.get(k, 0) - before.get(k, 0), 4) for k in (
        "num_prefill_tokens", "num_cached_tokens", "num_prompt_tokens", "busy_time_s",
        "gpu_forward_time_s") if isinstance(after.get(k), (int, float))}
    ctr["host_time_s"] = {k: round(v - before.get("host_time_s", {}).get(k, 0), 3)
                          for k, v in after.get("host_time_s", {}).items()}
    ctr["host_time_max_s"] = after.get("host_time_max_s")
    ctr["allocator"] = {k: (before.get("allocator", {}).get(k), v) for k, v in after.get("allocator", {}).items()}
    ctr["window"] = (round(t0, 4), round(t0 + dt, 4))  # perf_counter: bench/timeline.py --window
    return len(questions) / dt, ctr, outs


def hf_select(args, device, tokenizer_dir, questions, choices):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    n = min(args.hf_programs, len(questions))

    def program(q, chs):
        scores = []
        for ch in chs:  # one forward per choice, as a program-at-a-time user would
            ids = torch.tensor([tok.encode(q + ch)], device=device)
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(lp.gather(1, ids[0, 1:, None]).mean().item())
        return max(range(len(chs)), key=scores.__getitem__)

    program(questions[0], choices[0])  # warm-up
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    for q, ch in zip(questions[:n], choices[:n]):
        program(q, ch)
    return n / (time.perf_counter() - t0)


def bench_logprobs(args, server_args):
    rows = []
    with RuntimeProcess(args.model, timeout=900, **server_args) as rt:
        c = Client(rt)
        vocab = rt.info["vocab_size"]
        g = torch.Generator().manual_seed(1)
        for bs in (args.bs, 1):
            prompts = torch.randint(0, vocab, (bs, 128), generator=g).tolist()
            params = dict(max_new_tokens=args.gen_len, ignore_eos=True, temperature=0.0)

            def run(lp: bool) -> float:
                msgs = [protocol.GenerateReq(rid=rid(), input_ids=p, sampling_params=params,
                                             return_logprob=lp, top_logprobs_num=5 if lp else 0)
                        for p in prompts]
                t0 = time.perf_counter()
                outs = c.run_all(msgs)
                dt = time.perf_counter() - t0
                if lp:
                    assert all(len(o.meta_info["output_top_logprobs"]) == args.gen_len for o in outs)
                return sum(o.meta_info["completion_tokens"] for o in outs) / dt

            run(False), run(True)  # warm-up (kernel compiles, graphs)
            plain = [run(False), run(False)]
            with_lp = [run(True), run(True)]
            rows.append((bs, max(plain), max(with_lp)))
    return rows


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo", "Lima", "Cairo"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "active", "tags"],
}
REGEX = r"\(\d{3}\) \d{3}-\d{4}, [A-Z][a-z]{2,8} (St|Ave|Rd)\."


def valid_json(text: str) -> bool:
    """The schema's constraints, checked by hand (no jsonschema on the device image)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    props = SCHEMA["properties"]
    return (isinstance(obj, dict) and set(obj) == set(props)
            and isinstance(obj["name"], str) and len(obj["name"]) <= 12
            and type(obj["age"]) is int and 0 <= obj["age"] <= 120
            and obj["city"] in props["city"]["enum"] and type(obj["active"]) is bool
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
            and all(t in ("red", "green", "blue") for t in obj["tags"]))


def bench_grammar(args, server_args, *, jump: bool = True):
    """Rows of (workload, sglite, baseline, ratio) and a validity summary."""
    import re

    rows, notes = [], []
    n = args.grammar_bs
    prompts = [f"Person {i} as JSON:" for i in range(n)]
    with RuntimeProcess(args.model, timeout=900, disable_jump_forward=not jump, **server_args) as rt:
        c = Client(rt)

        def gens(kind, spec, idx, max_new):
            params = dict(max_new_tokens=max_new, temperature=0.0)
            if kind:
                params[kind] = spec
            return [protocol.GenerateReq(rid=rid(), text=prompts[i], sampling_params=params) for i in idx]

        def same_lengths(outs, idx):  # unconstrained gens of exactly these lengths
            return [protocol.GenerateReq(rid=rid(), text=prompts[i], sampling_params=dict(
                max_new_tokens=max(o.meta_info["completion_tokens"], 1), ignore_eos=True,
                temperature=0.0)) for i, o in zip(idx, outs)]

        def timed(msgs, label=None):
            before = c.info() if label else None
            t0 = time.perf_counter()
            outs = c.run_all(msgs)
            dt = time.perf_counter() - t0
            if label:  # where the server's time went: steps, forwards on the GPU, host
                after = c.info()
                d = {k: round(after[k] - before[k], 3) for k in (
                    "num_steps", "num_decode_tokens", "num_prefill_tokens", "busy_time_s",
                    "gpu_forward_time_s", "schedule_time_s") if isinstance(after.get(k), (int, float))}
                host = {k: round(v - before.get("host_time_s", {}).get(k, 0), 3)
                        for k, v in after.get("host_time_s", {}).items()}
                notes.append(f"{label}: {dt:.2f} s wall, server {d}, host time by phase {host}, "
                             f"longest single charge {after.get('host_time_max_s')}")
            return outs, sum(o.meta_info["completion_tokens"] for o in outs) / dt

        everyone = range(n)
        schema = json.dumps(SCHEMA)
        c.run_all(gens("json_schema", schema, range(8), 64) + gens("regex", REGEX, range(8), 64))  # compile, warm
        for name, kind, spec, check in (("JSON-schema", "json_schema", schema, valid_json),
                                        ("regex", "regex", REGEX, lambda t: re.fullmatch(REGEX, t))):
            if kind not in args.grammar_kinds.split(","):
                continue
            pairs, every_out = [], []  # (constrained, plain) tokens/s of each round, back to back
            for rep in range(args.grammar_repeat):
                outs, constrained = timed(gens(kind, spec, everyone, 160), f"{name} constrained, round {rep + 1}")
                _, plain = timed(same_lengths(outs, everyone), f"{name} baseline, round {rep + 1}")
                pairs.append((constrained, plain))
                every_out += outs
            constrained, plain, spread = _median_round(pairs)
            done = [o for o in every_out if o.meta_info["finish_reason"]["type"] == "stop"]  # all rounds
            bad = [o.text for o in done if not check(o.text)]
            notes.append(f"{name} (jump-forward {'on' if jump else 'off'}): {len(done)}/{len(every_out)} finished by "
                         f"the grammar, {len(bad)} invalid {bad[:2]}; sample {outs[0].text!r}; "
                         f"mean {sum(o.meta_info['completion_tokens'] for o in outs) / n:.1f} tokens")
            rows.append((f"{n} {name} gens{'' if jump else ', jump-forward off'}, tokens/s{spread}",
                         f"constrained {constrained:.0f}", f"unconstrained, same lengths {plain:.0f}",
                         constrained / plain))
        if jump and "half" in args.grammar_kinds.split(","):  # half-constrained: the plain half's speed beside constrained vs plain peers
            half = n // 2
            json_outs = c.run_all(gens("json_schema", schema, range(half), 160))
            plain_idx = range(half, n)

            def plain_half(peers):
                msgs = gens(None, None, plain_idx, 96) + peers
                for m in msgs[:half]:
                    m.sampling_params["ignore_eos"] = True
                t0, done_at = time.perf_counter(), {}
                for m in msgs:
                    c.sock.send(protocol.encode(m))
                want = {m.rid for m in msgs[:half]}
                while len(done_at) < len(msgs):
                    r = wait_reply(c.sock, alive=rt.is_alive, timeout=900, describe=rt.log_tail)
                    if getattr(r, "finished", True):
                        done_at[r.rid] = (time.perf_counter() - t0, r.meta_info["completion_tokens"])
                t_plain = max(done_at[r][0] for r in want)
                return sum(done_at[r][1] for r in want) / t_plain

            pairs = [(plain_half(gens("json_schema", schema, range(half), 160)),
                      plain_half(same_lengths(json_outs, range(half)))) for _ in range(args.grammar_repeat)]
            beside_json, beside_plain, spread = _median_round(pairs)
            rows.append((f"{half} plain gens beside {half} others, plain half's tokens/s{spread}",
                         f"beside JSON-schema gens {beside_json:.0f}",
                         f"beside unconstrained gens {beside_plain:.0f}", beside_json / beside_plain))
    return rows, notes


def _median_round(pairs: list[tuple[float, float]]) -> tuple[float, float, str]:
    """The round of median ratio among all but the first (a warm-up, when there are more), and a
    note of the rounds' ratio range: the host's speed moves between and within calls."""
    measured = pairs[1:] if len(pairs) > 1 else pairs
    ranked = sorted(measured, key=lambda p: p[0] / p[1])
    a, b = ranked[(len(ranked) - 1) // 2]
    if len(ranked) == 1:
        return a, b, ""
    ratios = [x / y for x, y in ranked]
    return a, b, f" (median of {len(ranked)} rounds after a warm-up; ratios {ratios[0]:.2f}-{ratios[-1]:.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="config-only folder (bench/make_bench_model.py)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-select", type=int, default=200)
    ap.add_argument("--hf-programs", type=int, default=20, help="0: no transformers baseline")
    ap.add_argument("--no-select-radix-off", dest="select_radix_off", action="store_false",
                    help="select with the radix cache on only (e.g. under SGLITE_PROFILE)")
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--grammar-bs", type=int, default=256)
    ap.add_argument("--num-threads", type=int, default=None, help="the servers' torch CPU threads")
    ap.add_argument("--server-args", type=json.loads, default={},
                    help='more runtime arguments for every server, as JSON: e.g. \'{"chunked_prefill_size": 8192}\'')
    ap.add_argument("--grammar-repeat", type=int, default=1,
                    help="rounds of each grammar workload, constrained and baseline back to back; with "
                         "more than one the first is a warm-up and the table reports the median round")
    ap.add_argument("--grammar-jump", default="on,off", help="jump-forward settings to run")
    ap.add_argument("--parts", default="select,logprobs,grammar")
    ap.add_argument("--grammar-kinds", default="json_schema,regex,half",
                    help="grammar workloads to run (the half-constrained batch is 'half')")
    args = ap.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"card: {card}, torch {torch.__version__}", flush=True)
    server_args = dict(device=args.device, load_format="dummy", log_interval=0)
    if args.num_threads is not None:
        server_args["num_threads"] = args.num_threads
    server_args.update(args.server_args)
    table = []
    if "select" in args.parts:
        questions, choices = select_workload(random.Random(0), args.num_select)
        on, ctr_on, outs = bench_select(args, server_args, True, questions, choices)
        print(f"select counters radix on {ctr_on}; meta {outs[0].meta_info}", flush=True)
        if args.select_radix_off:
            off, ctr_off, _ = bench_select(args, server_args, False, questions, choices)
            print(f"select counters radix off {ctr_off}", flush=True)
            table.append(("20-shot select, programs/s", f"radix on {on:.1f}", f"radix off {off:.1f}", on / off))
        if ctr_on.get("busy_time_s"):
            share = ctr_on.get("gpu_forward_time_s", 0) / ctr_on["busy_time_s"]
            table.append(("20-shot select, radix on: GPU time in forwards / server busy time",
                          f"{ctr_on.get('gpu_forward_time_s', 0):.2f} s", f"{ctr_on['busy_time_s']:.2f} s",
                          share))
        if args.hf_programs > 0:
            hf = hf_select(args, device, args.model, questions, choices)
            table.append(("20-shot select, programs/s", f"radix on {on:.1f}",
                          f"transformers 1 program at a time {hf:.1f}", on / hf))
    if "logprobs" in args.parts:
        for bs, plain, lp in bench_logprobs(args, server_args):
            table.append((f"{bs} gens x {args.gen_len} tokens, tokens/s", f"top-5 logprobs {lp:.0f}",
                          f"no logprobs {plain:.0f}", lp / plain))
    if "grammar" in args.parts:
        for jump in [j == "on" for j in args.grammar_jump.split(",")]:
            rows, notes = bench_grammar(args, server_args, jump=jump)
            table += rows
            print("\n".join(notes), flush=True)
    print(f"\n| workload ({card}) | sglite | baseline, same run | ratio |\n|---|---|---|---|")
    for name, a, b, ratio in table:
        print(f"| {name} | {a} | {b} | {ratio:.2f}x |")
    if os.environ.get("OUT"):
        json.dump(table, open(os.path.join(os.environ["OUT"], "structured.json"), "w"))


if __name__ == "__main__":
    main()
