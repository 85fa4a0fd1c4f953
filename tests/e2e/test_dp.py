"""Issue 21, data parallelism: `sgl.Runtime(dp_size=2)` is a router process in front of two
runtime replicas. It answers a batch of shared-prefix programs (`run_batch`) with one runtime's
greedy text, keeps each shared prefix on one replica (cache hits per request not lower than one
runtime's), gets an abort to the replica that holds the request, and when a replica is killed
fails that replica's requests with an error naming it while the other keeps serving.

The model is a tiny random Llama with a small trained tokenizer (tests/runtime/models/family.py),
so that the replicas start and serve text in seconds on two CPU cores. The one-runtime baseline is
replica 0 reached directly: a plain runtime of the same folder and arguments."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import sglite as sgl
from sglite import protocol

transformers = pytest.importorskip("transformers")

RUNTIME_ARGS = dict(dtype="float32", max_total_tokens=8192, max_running_requests=16,
                    log_interval=0)

# Plain text, no chat template: the two documents share no first token and the questions of one
# document share nothing past "\nQ:", so every program after the first of its document reuses
# exactly the document's tokens, on one runtime and on dp 2 alike, whatever the arrival order.
DOCS = [
    "The cats: Mira keeps three cats named Ash, Juniper and Pip in a blue house by the harbour, "
    "and every morning she walks them along the old stone pier before the fishing boats come in.",
    "Write down the snack: toast two slices of rye bread, spread them with butter, add thin slices "
    "of radish and a pinch of salt, and serve them at once with a pot of black tea.",
]
QUESTIONS = ["who is mentioned?", "name one colour.", "sum it up in five words."]


@sgl.function
def ask(s, doc, question):
    s += doc + "\nQ: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=8, temperature=0)
    s += "\nSure? " + sgl.select("sure", choices=["yes", "no", "maybe"])  # a ScoreReq, whole


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.runtime.models import family

    config = transformers.LlamaConfig(
        vocab_size=family.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    folder, _, _ = family.save_model(tmp_path_factory.mktemp("dp-llama"), config, "chatml")
    return folder


@pytest.fixture(scope="module")
def dp_runtime(tiny_model):
    rt = sgl.Runtime(tiny_model, dp_size=2, launch_timeout=300, **RUNTIME_ARGS)
    yield rt
    rt.shutdown()


def _batch():
    return [{"doc": d, "question": q} for d in DOCS for q in QUESTIONS]


def _cached_per_request(backend, run):
    before = backend.get_server_info()
    states = run()
    after = backend.get_server_info()
    num = after["num_requests"] - before["num_requests"]  # gens, and select's prefix + choices
    return states, (after["num_cached_tokens"] - before["num_cached_tokens"]) / num, before, after


def test_dp2_answers_shared_prefix_programs_with_one_runtimes_text_and_cache(dp_runtime):
    # the baseline: replica 0 alone, reached around the router (a plain `sglite serve` of the
    # same folder and arguments), with its cache flushed before each run
    single = sgl.RuntimeEndpoint(dp_runtime.get_server_info()["replicas"][0]["address"])
    try:
        dp_runtime.flush_cache()
        ref, ref_cached, _, _ = _cached_per_request(
            single, lambda: ask.run_batch(_batch(), backend=single))
    finally:
        single.shutdown()
    dp_runtime.flush_cache()
    out, dp_cached, before, after = _cached_per_request(
        dp_runtime, lambda: ask.run_batch(_batch(), backend=dp_runtime))
    for r, o in zip(ref, out):
        assert r.error() is None and o.error() is None
        assert o["answer"] == r["answer"] and o["sure"] == r["sure"]
    assert after["dp_size"] == 2
    assert len({after["pid"], *(r["pid"] for r in after["replicas"])}) == 3  # router + replicas
    # each document's three programs went to one replica (one prefix miss each), not split
    per_replica = [a["num_requests"] - b["num_requests"]
                   for a, b in zip(after["replicas"], before["replicas"])]
    assert per_replica[0] == per_replica[1] == (after["num_requests"] - before["num_requests"]) / 2
    assert [r["num_routed"] for r in after["replicas"]] == [6, 6]  # 3 gens + 3 selects each
    assert dp_cached >= ref_cached > 0
    print(f"cached tokens per request: dp 2 {dp_cached:.1f}, one runtime {ref_cached:.1f}")


def _client(make_client, rt):
    return make_client(rt.address, alive=rt.process.is_alive, timeout=120)


def _long(client, text, max_new_tokens=2000):
    rid = client.new_rid()
    client.send(protocol.GenerateReq(rid=rid, text=text, stream=True, sampling_params={
        "max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0}))
    return rid


def test_abort_reaches_the_replica(dp_runtime, make_client):
    c = _client(make_client, dp_runtime)
    rid = _long(c, DOCS[0])
    first = c.recv()
    assert first.rid == rid and not isinstance(first, protocol.ErrorOut), first
    c.send(protocol.AbortReq(rid=rid))
    while True:
        reply = c.recv()
        assert reply.rid == rid and isinstance(reply, protocol.GenerateOut), reply
        if reply.finished:
            break
    assert reply.meta_info["finish_reason"]["type"] == "abort"
    assert reply.meta_info["completion_tokens"] < 2000
    deadline = time.monotonic() + 10
    while (info := c.info())["num_running_reqs"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert info["num_running_reqs"] == 0 and all(r["load"] == 0 for r in info["replicas"])


def _router_cmd(*replicas, timeout=30):
    address = f"ipc://{tempfile.gettempdir()}/sglite-test-router-{uuid.uuid4().hex[:8]}.sock"
    cmd = [sys.executable, "-m", "sglite.runtime.router", "--address", address,
           "--ready-timeout", str(timeout)]
    for r in replicas:
        cmd += ["--replica", r]
    return address, cmd


def test_router_attaches_to_running_replicas_and_leaves_them_running(dp_runtime, make_client):
    replicas = [r["address"] for r in dp_runtime.get_server_info()["replicas"]]
    address, cmd = _router_cmd(*replicas)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = make_client(address, alive=lambda: proc.poll() is None, timeout=60)
        params = {"max_new_tokens": 6, "temperature": 0}
        via_attached = c.generate(DOCS[0] + "\nQ: who?", sampling_params=params)
        info = c.info()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert via_attached["error"] is None and info["dp_size"] == 2
    assert [r["address"] for r in info["replicas"]] == replicas
    direct = _client(make_client, dp_runtime).generate(DOCS[0] + "\nQ: who?",
                                                       sampling_params=params)
    assert direct["text"] == via_attached["text"]  # and the replicas outlived the attached router


def test_attaching_to_an_address_nothing_serves_fails_naming_it():
    dead = f"ipc://{tempfile.gettempdir()}/sglite-test-nothing-{uuid.uuid4().hex[:8]}.sock"
    _, cmd = _router_cmd(dead, timeout=1)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"replica {dead}: no answer" in out.stderr


VICTIM_CLIENT = """
import sys, time, zmq
from sglite import protocol
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
for i, text in enumerate(sys.argv[2:]):
    sock.send(protocol.encode(protocol.GenerateReq(rid=f"victim-{i}", text=text, sampling_params={
        "max_new_tokens": 2000, "ignore_eos": True})))
print("sent", flush=True)
time.sleep(600)
"""


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_a_killed_client_has_its_requests_aborted_at_the_replicas(dp_runtime, make_client):
    probe = _client(make_client, dp_runtime)
    info = probe.info()
    decoded = info["num_decode_tokens"]
    replicas = [make_client(r["address"], timeout=30) for r in info["replicas"]]
    victim = subprocess.Popen([sys.executable, "-c", VICTIM_CLIENT, dp_runtime.address, *DOCS],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "sent"
        running = _wait_for(lambda: probe.info()["num_running_reqs"] == 2, 30)
        assert running, probe.info()
    finally:
        victim.kill()
        victim.wait()
    # non-streaming: nothing was sent to the client; the router saw its connection close (2 s, as
    # the runtime itself must: tests/e2e/test_liveness.py). The replicas are asked directly, so
    # no message through the router wakes it meanwhile.
    assert _wait_for(lambda: not any(r.info()["num_running_reqs"] for r in replicas), 2)
    info = probe.info()
    assert all(r["load"] == 0 for r in info["replicas"]), info
    assert info["num_decode_tokens"] - decoded < 2 * 2000  # cut short, not run to their end


def test_killed_replica_fails_its_requests_by_name_and_the_other_serves(dp_runtime, make_client):
    """(last in this module: it leaves the dp runtime with one replica)"""
    c, probe = _client(make_client, dp_runtime), _client(make_client, dp_runtime)
    rids = [_long(c, doc) for doc in DOCS]  # one prefix each: one per replica
    seen = set()
    while len(seen) < 2:  # both are decoding
        seen.add(c.recv().rid)
    info = probe.info()  # (c's streams would interleave with the answer)
    assert [r["load"] for r in info["replicas"]] == [1, 1]
    victim = info["replicas"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    while not isinstance(reply := c.recv(), protocol.ErrorOut):
        assert reply.rid in rids and not reply.finished
    assert f"replica 1 ({victim['address']}) died" in reply.message
    survivor = next(r for r in rids if r != reply.rid)
    c.send(protocol.AbortReq(rid=survivor))  # still decoding on replica 0, which answers
    result = c.collect([survivor])[survivor]
    assert result["error"] is None and result["meta_info"]["finish_reason"]["type"] == "abort"
    # new requests go to the survivor; info says which replica is gone
    again = c.generate(DOCS[1], sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert again["error"] is None and again["meta_info"]["completion_tokens"] == 4
    info = c.info()
    assert [r["alive"] for r in info["replicas"]] == [True, False]
    assert "died" in info["replicas"][1]["error"]
