"""Issue 20 items 3 and 4, with real processes killed by SIGKILL: the runtime aborts a killed
client's requests (non-streaming too) and its KV is back at the idle level within 2 s; a client
attached by address only notices a killed (or frozen) runtime within 5 s.

The runtimes here serve a tiny random model (load_format="dummy", input_ids only): they start in
a few seconds, and this module owns them, so their counters see no other test's requests."""

import signal
import subprocess
import sys
import threading
import time

import pytest

import sglite as sgl
from sglite import protocol
from sglite.lang.backend.client import ZmqClient
from sglite.launch import RuntimeProcess

TINY = dict(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=4096,
            log_interval=0)
NUM_REQS, PROMPT_LEN, MAX_NEW = 4, 100, 800

CLIENT = """
import sys, time, zmq
from sglite import protocol
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
for i in range(int(sys.argv[2])):
    sock.send(protocol.encode(protocol.GenerateReq(
        rid=f"victim-{i}", input_ids=[(7 * i + j) % 500 + 3 for j in range(int(sys.argv[3]))],
        sampling_params={"max_new_tokens": int(sys.argv[4]), "ignore_eos": True})))
print("sent", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def tiny_runtime():
    with RuntimeProcess(None, timeout=300, **TINY) as rt:
        yield rt


def _in_use(info: dict) -> int:
    """KV slots neither free nor evictable: held by running requests (0 when idle)."""
    return info["kv_total"] - info["kv_free"] - info["kv_evictable"]


def _wait_for(predicate, timeout: float, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def test_killed_non_streaming_client_frees_its_kv_within_2s(tiny_runtime, make_client):
    probe = make_client(tiny_runtime.address, alive=tiny_runtime.is_alive, timeout=60)
    idle = probe.info()
    assert idle["kv_held_by_running"] == 0 and idle["num_running_reqs"] == 0
    victim = subprocess.Popen([sys.executable, "-c", CLIENT, tiny_runtime.address,
                               str(NUM_REQS), str(PROMPT_LEN), str(MAX_NEW)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "sent"
        running = _wait_for(lambda: (lambda i: i["num_running_reqs"] == NUM_REQS
                                     and i["num_decode_tokens"] > idle["num_decode_tokens"]
                                     and i)(probe.info()), timeout=30)
        assert running, "the victim's requests never ran"
        assert _in_use(running) >= NUM_REQS * PROMPT_LEN
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        after = _wait_for(lambda: (lambda i: i["num_running_reqs"] == 0
                                   and _in_use(i) == 0 and i)(probe.info()), timeout=10)
        elapsed = time.monotonic() - killed_at
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.stdout.close()
    assert after, "the killed client's requests still hold KV after 10 s"
    print(f"killed client: {_in_use(running)} KV slots back {elapsed:.3f} s after the SIGKILL")
    assert elapsed < 2.0, f"KV back to idle only {elapsed:.2f} s after the kill"
    # aborted, not finished: the requests had far more tokens to go
    assert after["num_decode_tokens"] - idle["num_decode_tokens"] < NUM_REQS * MAX_NEW // 2
    assert after["kv_held_by_running"] == 0 and after["kv_protected"] == 0
    # the runtime goes on serving
    r = probe.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3,
                                                              "ignore_eos": True})
    assert r["error"] is None and r["meta_info"]["completion_tokens"] == 3


def _long_request_then(endpoint, action) -> tuple[BaseException | None, float]:
    """Run a long generation through the endpoint's client, call action() once it runs, and
    return what the waiting thread raised and how long after the action."""
    client = endpoint.client
    req = protocol.GenerateReq(rid=client.new_rid("gen"), input_ids=[3, 4, 5],
                               sampling_params={"max_new_tokens": 1000, "ignore_eos": True})
    q = client.request(req)
    assert _wait_for(lambda: endpoint.get_server_info()["num_running_reqs"] == 1, timeout=30)
    outcome: dict = {}

    def wait():
        try:
            outcome["reply"] = client.recv(q)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"], outcome["at"] = e, time.monotonic()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    start = time.monotonic()
    action()
    waiter.join(timeout=30)
    return outcome.get("error"), outcome.get("at", time.monotonic()) - start


def test_attached_endpoint_sees_a_frozen_runtime_by_heartbeats(tiny_runtime, make_client):
    rt = tiny_runtime
    endpoint = sgl.RuntimeEndpoint(rt.address)
    try:  # SIGSTOP closes no socket: only the missed heartbeats can tell
        error, elapsed = _long_request_then(endpoint, lambda: rt.proc.send_signal(signal.SIGSTOP))
        assert isinstance(error, sgl.RuntimeDied) and "heartbeat" in str(error), error
        assert elapsed < 5.0, f"the waiter raised {elapsed:.1f} s after the runtime froze"
        print(f"frozen runtime: the attached waiter raised {elapsed:.3f} s after the SIGSTOP")
    finally:
        rt.proc.send_signal(signal.SIGCONT)
        endpoint.shutdown()
    # thawed, the runtime finds the client's connection closed and drops its request
    probe = make_client(rt.address, alive=rt.is_alive, timeout=60)
    assert _wait_for(lambda: probe.info()["num_running_reqs"] == 0, timeout=5)


def test_attached_endpoint_sees_a_killed_runtime_within_5s(tiny_runtime):  # (ends the runtime)
    rt = tiny_runtime
    endpoint = sgl.RuntimeEndpoint(rt.address)  # address only: no process handle, default timeout
    try:
        error, elapsed = _long_request_then(endpoint, lambda: rt.proc.send_signal(signal.SIGKILL))
        assert isinstance(error, sgl.RuntimeDied), error
        assert elapsed < 5.0, f"the waiter raised {elapsed:.1f} s after the kill"
        print(f"killed runtime: the attached waiter raised {elapsed:.3f} s after the SIGKILL")
        with pytest.raises(sgl.RuntimeDied):  # later calls fail at once
            endpoint.get_server_info()
    finally:
        endpoint.shutdown()


def test_heartbeats_are_answered_while_the_runtime_is_inside_long_forwards(runtime_process):
    """The embedded model's 512-token prefill chunks take longer than this client's heartbeat
    timeout; libzmq's I/O thread in the runtime answers the heartbeats meanwhile, so the client
    never takes the busy runtime for a dead one."""
    timeout = 0.3
    client = ZmqClient(runtime_process.address, heartbeat_interval=0.1, heartbeat_timeout=timeout)
    try:
        before = client.call(protocol.InfoReq(rid=client.new_rid())).info
        out = client.call(protocol.GenerateReq(
            rid=client.new_rid(), text="word " * 600, sampling_params={"max_new_tokens": 1}))
        assert isinstance(out, protocol.GenerateOut), out
        after = client.call(protocol.InfoReq(rid=client.new_rid())).info
    finally:
        client.close()
    chunks = (after["num_prefill_tokens"] - before["num_prefill_tokens"]) / 512
    per_chunk = (after["prefill_time_s"] - before["prefill_time_s"]) / max(chunks, 1)
    print(f"long forwards: {chunks:.1f} prefill chunks of {per_chunk:.2f} s each, heartbeat "
          f"timeout {timeout} s, no false death")
    if per_chunk <= timeout:
        pytest.skip(f"forwards of {per_chunk:.2f} s are too short to test a {timeout} s timeout")
