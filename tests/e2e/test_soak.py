"""Issue 20 soak: hundreds of mixed requests at once (gens, selects, regex gens, forks, programs
that raise, bad regexes, bad sampling values, over-long prompts) beside a raw client that aborts
streams, disconnects with requests in flight and sends garbage. Every good program finishes
with what it asked for, every bad one fails alone with its reason, and the runtime ends idle:
no request left, KV at its idle level, the KV integrity check clean.

The model is random and tiny (2 layers, hidden 64) behind the embedded model's real tokenizer,
so text programs run fast (measured: ~350 requests in 8-12 s on the shared 2-core box)."""

import json
import random
import re
import shutil
import threading
import time

import pytest
import zmq

import sglite as sgl
from sglite import protocol
from sglite.launch import RuntimeProcess

NUM_PROGRAMS = 240
NUM_RAW = 60  # raw-protocol requests beside the programs (aborted streams, dropped clients)
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=2048)


@pytest.fixture(scope="module")
def soak_runtime(tmp_path_factory):
    from sglite.runtime.models.loader import resolve_model

    src, folder = resolve_model(None), tmp_path_factory.mktemp("tiny-with-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
        shutil.copy(f"{src}/{name}", folder / name)
    with open(f"{src}/config.json") as f:
        config = {**json.load(f), **TINY_CONFIG}
    (folder / "config.json").write_text(json.dumps(config))
    with RuntimeProcess(str(folder), timeout=300, load_format="dummy", dtype="float32",
                        max_total_tokens=1200, max_running_requests=48,
                        chunked_prefill_size=256, log_interval=0) as rt:
        yield rt


@sgl.function
def plain(s, i, n):
    s += f"Question {i}: what comes next? " + sgl.gen("a", max_tokens=n, ignore_eos=True)


@sgl.function
def choose(s, i):
    s += f"Item {i} is " + sgl.select("c", choices=["red", "green", "a blue one"])


@sgl.function
def digits(s, i):
    s += f"Code {i}: " + sgl.gen("r", regex="[0-9]{3}", max_tokens=8)


@sgl.function
def forked(s, i):
    s += f"Story {i}."
    forks = s.fork(2)
    for f in forks:
        f += " Then " + sgl.gen("x", max_tokens=3, ignore_eos=True)
    s += forks[0]["x"] + forks[1]["x"]


@sgl.function
def raises(s, i):
    s += f"Step {i}: " + sgl.gen("a", max_tokens=2, ignore_eos=True)
    raise ValueError(f"boom {i}")


@sgl.function
def bad_regex(s, i):
    s += f"Bad {i}: " + sgl.gen("r", regex="([0-9", max_tokens=4)


@sgl.function
def bad_value(s, i):
    s += f"Odd {i}: " + sgl.gen("a", max_tokens=2, top_p=1.5)


@sgl.function
def too_long(s, i):
    s += " ".join(f"word{i}-{k}" for k in range(2500)) + sgl.gen("a", max_tokens=2)


KINDS = [plain, plain, plain, choose, digits, forked, raises, bad_regex, bad_value, too_long]


def _check(kind, args, state) -> None:
    i, err = args["i"], state.error()
    if kind is plain:
        assert err is None, err
        assert state.get_meta_info("a")["completion_tokens"] == args["n"]
    elif kind is choose:
        assert err is None and state["c"] in ("red", "green", "a blue one"), err
    elif kind is digits:
        assert err is None and re.fullmatch("[0-9]{3}", state["r"]), (err, state["r"])
    elif kind is forked:
        assert err is None and state.text().startswith(f"Story {i}."), err
    elif kind is raises:
        assert f"boom {i}" in str(err)
    elif kind is bad_regex:
        assert err is not None and "regex" in str(err).lower(), err
    elif kind is bad_value:
        assert err is not None and "top_p" in str(err), err
    else:
        assert err is not None and "tokens" in str(err), err


def _raw_chaos(address: str, rng: random.Random, report: dict) -> None:
    """Aborted streams, a client that leaves with requests in flight, garbage payloads."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    long = {"max_new_tokens": 400, "ignore_eos": True}
    aborted = 0
    for k in range(NUM_RAW // 2):
        rid = f"chaos-{k}"
        sock.send(protocol.encode(protocol.GenerateReq(
            rid=rid, text=f"Stream {k}", stream=True, sampling_params=long)))
        if k % 3 == 0:
            sock.send(b"\x91" * 3000 + b"\xc0")
        sock.send(protocol.encode(protocol.AbortReq(rid=rid)))
        aborted += 1
    # wait until every aborted stream reports its end
    ended, deadline = set(), time.monotonic() + 120
    while len(ended) < aborted and time.monotonic() < deadline:
        if not sock.poll(1000):
            continue
        reply = protocol.decode_reply(sock.recv())
        if isinstance(reply, protocol.GenerateOut) and reply.finished:
            ended.add(reply.rid)
            assert reply.meta_info["finish_reason"]["type"] == "abort", reply.meta_info
    report["aborted_streams_ended"] = len(ended) == aborted
    sock.close()
    leaver = ctx.socket(zmq.DEALER)  # leaves with non-streaming requests in flight
    leaver.setsockopt(zmq.LINGER, 0)
    leaver.connect(address)
    for k in range(NUM_RAW // 2):
        leaver.send(protocol.encode(protocol.GenerateReq(
            rid=f"leave-{k}", text=f"Left {k} " * rng.randint(1, 20), sampling_params=long)))
    time.sleep(0.5)
    leaver.close()
    report["done"] = True


def test_soak_mixed_load_ends_idle_and_intact(soak_runtime, make_client):
    rng = random.Random(7)
    endpoint = sgl.RuntimeEndpoint(soak_runtime.address)
    report: dict = {}
    chaos = threading.Thread(target=_raw_chaos, args=(soak_runtime.address, rng, report),
                             daemon=True)
    start = time.monotonic()
    chaos.start()
    try:
        calls = [(KINDS[k % len(KINDS)], {"i": k, **({"n": rng.randint(1, 12)}
                                                    if KINDS[k % len(KINDS)] is plain else {})})
                 for k in range(NUM_PROGRAMS)]
        rng.shuffle(calls)
        by_kind: dict = {}
        for kind, args in calls:
            by_kind.setdefault(kind, []).append(args)
        threads = []
        results: dict = {}

        def run(kind, batch):
            results[kind] = kind.run_batch(batch, backend=endpoint, temperature=0,
                                           num_threads=16)

        for kind, batch in by_kind.items():  # every kind at once, each a batch of its own
            threads.append(threading.Thread(target=run, args=(kind, batch)))
            threads[-1].start()
        for t in threads:
            t.join(timeout=120)
        chaos.join(timeout=120)
        elapsed = time.monotonic() - start
        for kind, batch in by_kind.items():
            for args, state in zip(batch, results[kind]):
                _check(kind, args, state)
        assert report.get("done") and report.get("aborted_streams_ended"), report
    finally:
        endpoint.shutdown()

    probe = make_client(soak_runtime.address, alive=soak_runtime.is_alive, timeout=60)
    deadline = time.monotonic() + 10
    while (info := probe.info())["num_running_reqs"] + info["num_waiting_reqs"] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0, info
    assert info["kv_held_by_running"] == 0 and info["kv_protected"] == 0, info
    assert info["kv_free"] + info["kv_evictable"] == info["kv_total"], info
    checked = probe.request(protocol.InfoReq(rid=probe.new_rid(), check_integrity=True)).info
    assert checked["integrity"] == "ok"
    assert checked["num_requests"] >= NUM_PROGRAMS + NUM_RAW
    print(f"soak: {checked['num_requests']} requests, {checked['num_retractions']} retractions, "
          f"{elapsed:.1f} s")
