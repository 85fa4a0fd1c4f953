"""A second, deliberately small runtime: KV runs out while requests decode, so some are retracted
(their KV given back, their tokens kept) and resumed later; every output must equal the one the
request gets alone. The last test kills this runtime under a waiting client."""

import signal

import pytest

from sglite import protocol
from sglite.launch import RuntimeDied, RuntimeProcess

PARAMS = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [f"Story {i}: once upon a time, in a village by the {w}, there lived a"
           for i, w in enumerate(["sea", "forest", "river", "mountain", "lake", "desert",
                                  "castle", "city"])]


@pytest.fixture(scope="module")
def small_runtime():
    # 8 requests x (~25 prompt + 12 output) tokens need ~300 slots; the pool has 160
    with RuntimeProcess(None, timeout=900, dtype="float32", max_total_tokens=160,
                        chunked_prefill_size=64, log_interval=0) as rt:
        yield rt


@pytest.fixture
def small_client(small_runtime, make_client):
    return make_client(small_runtime.address, alive=small_runtime.is_alive)


def test_retraction_completes_every_request_with_unchanged_outputs(small_client):
    alone = [small_client.generate(p, sampling_params=PARAMS) for p in PROMPTS]
    assert all(a["error"] is None for a in alone)
    before = small_client.info()["num_retractions"]
    rids = [small_client.new_rid() for _ in PROMPTS]
    for rid, p in zip(rids, PROMPTS):
        small_client.send(protocol.GenerateReq(rid=rid, text=p, sampling_params=PARAMS))
    together = small_client.collect(rids)
    for p, a, rid in zip(PROMPTS, alone, rids):
        assert together[rid]["error"] is None
        assert together[rid]["text"] == a["text"], f"output changed for {p!r}"
        assert together[rid]["meta_info"]["completion_tokens"] == 12
    info = small_client.info()
    assert info["num_retractions"] > before, "the pool was meant to run out"
    assert info["kv_held_by_running"] == 0 and info["num_running_reqs"] == 0
    assert info["kv_free"] + info["kv_evictable"] == info["kv_total"]


def test_killed_runtime_makes_a_waiting_client_raise(small_runtime, small_client):
    rid = small_client.new_rid()
    small_client.send(protocol.GenerateReq(rid=rid, text=PROMPTS[0], stream=True, sampling_params={
        "max_new_tokens": 200, "ignore_eos": True}))
    assert small_client.recv().rid == rid  # it is running
    small_runtime.proc.send_signal(signal.SIGKILL)
    with pytest.raises(RuntimeDied):
        while True:
            small_client.recv(timeout=60)
    assert not small_runtime.is_alive()
