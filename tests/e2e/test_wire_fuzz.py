"""Issue 20: fuzz the runtime's wire decoder and handlers with thousands of random and mutated
messages from one client, then check that the runtime still answers, that nothing it did for
the fuzzer outlives the fuzzer's connection, and that no message reached the handler's last guard
(an exception other than a per-request error)."""

import os
import random
import time

import msgspec
import zmq

from sglite import protocol

SEED = int(os.environ.get("SGLITE_FUZZ_SEED", "20"))
NUM_MUTATED, NUM_RANDOM_BYTES, NUM_RANDOM_OBJECTS = 2000, 600, 600
SMALL = {"max_new_tokens": 2, "temperature": 0}

VALID = [
    protocol.GenerateReq(rid="g1", text="Hello there", sampling_params=SMALL),
    protocol.GenerateReq(rid="g2", input_ids=[1, 2, 3], stream=True, return_logprob=True,
                         top_logprobs_num=1, logprob_start_len=0,
                         sampling_params={**SMALL, "stop": ["\n"], "stop_token_ids": [5]}),
    protocol.GenerateReq(rid="g3", text="A", sampling_params={**SMALL, "regex": "[ab]+"}),
    protocol.GenerateReq(rid="g4", text="B", sampling_params={
        **SMALL, "json_schema": '{"type": "object", "properties": {"a": {"type": "integer"}}}'}),
    protocol.ScoreReq(rid="s1", text="Pick:", choices=["a", "bb"], unconditional=True),
    protocol.AbortReq(rid="g1"),
    protocol.InfoReq(rid="i1"),
    protocol.FlushCacheReq(rid="f1"),
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a byte
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:  # insert bytes
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:  # truncate
            del b[i:]
        elif op == 3 and b:  # duplicate a slice
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 16)]
        else:  # a msgpack marker that announces a huge container or string
            b[i:i] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff",
                                 b"\xdb\xff\xff\xff\xf0", b"\xcf" + b"\xff" * 8, b"\xc1"])
    return bytes(b)


def _random_object(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 40 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**63 - 1, -2**63, 2**64 - 1, rng.randint(-9, 9)])
    if kind == 2:
        return rng.choice([0.0, float("nan"), float("inf"), -1e308, rng.random()])
    if kind == 3:
        return rng.choice(["", "rid", "generate", "type", "text", "\ud800", "é" * rng.randint(0, 5)])
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 6)))
    if kind == 5:
        return rng.choice(["generate", "score", "graph", "abort", "info", "flush_cache"])
    if kind == 6:
        return [_random_object(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    fields = ["type", "rid", "text", "input_ids", "sampling_params", "stream", "choices",
              "nodes", "top_logprobs_num", "logprob_start_len", "max_new_tokens", "regex"]
    return {rng.choice(fields): _random_object(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _fuzz_messages(rng: random.Random):
    valid = [protocol.encode(m) for m in VALID]
    for _ in range(NUM_MUTATED):
        yield _mutate(rng, rng.choice(valid))
    for _ in range(NUM_RANDOM_BYTES):
        yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    enc = msgspec.msgpack.Encoder()
    for _ in range(NUM_RANDOM_OBJECTS):
        obj = _random_object(rng)
        if isinstance(obj, dict) and rng.random() < 0.7:
            obj["type"] = rng.choice(["generate", "score", "abort", "info", "flush_cache"])
            obj.setdefault("rid", f"fz{rng.randrange(100)}")
        try:
            yield enc.encode(obj)
        except Exception:  # lone surrogates cannot be encoded by a well-behaved client
            yield _mutate(rng, enc.encode(str(obj).encode("utf-8", "replace")))
    yield b"\x91" * 5000 + b"\xc0"  # nested 5000 deep
    yield b"\x81\xa1a" * 5000 + b"\xc0"


def test_fuzzed_messages_leave_the_runtime_serving_and_idle(runtime_process, make_client):
    log_start = os.path.getsize(runtime_process.log_path) if hasattr(runtime_process, "log_path") \
        else None
    rng = random.Random(SEED)
    fuzzer = zmq.Context.instance().socket(zmq.DEALER)
    fuzzer.setsockopt(zmq.LINGER, 0)
    fuzzer.setsockopt(zmq.SNDHWM, 0)  # never block in send while the runtime runs a step
    fuzzer.connect(runtime_process.address)
    num_sent, start = 0, time.monotonic()
    for data in _fuzz_messages(rng):
        fuzzer.send(data)
        num_sent += 1
        while fuzzer.poll(0):  # keep our own receive queue short
            fuzzer.recv()
    # the fuzzer's last message is an InfoReq: once it is answered, all the others were handled
    fuzzer.send(protocol.encode(protocol.InfoReq(rid="fuzz-done")))
    deadline = time.monotonic() + 90
    while True:
        assert fuzzer.poll(int(max(deadline - time.monotonic(), 0) * 1000)), (
            f"the runtime did not get through {num_sent} fuzzed messages in "
            f"{time.monotonic() - start:.0f} s")
        try:
            if protocol.decode_reply(fuzzer.recv()).rid == "fuzz-done":
                break
        except msgspec.DecodeError:
            raise AssertionError("the runtime sent an undecodable reply")
    elapsed = time.monotonic() - start
    fuzzer.close()  # the runtime aborts whatever the fuzzer's messages started
    assert num_sent > 3000 and runtime_process.is_alive()

    client = make_client(runtime_process.address, alive=runtime_process.is_alive, timeout=120)
    r = client.generate("Hello", sampling_params={"max_new_tokens": 3, "temperature": 0,
                                                  "ignore_eos": True})
    assert r["error"] is None and r["meta_info"]["completion_tokens"] == 3
    deadline = time.monotonic() + 30
    while (info := client.info())["num_running_reqs"] + info["num_waiting_reqs"] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0
    assert info["kv_held_by_running"] == 0 and info["kv_protected"] == 0
    assert info["kv_free"] + info["kv_evictable"] == info["kv_total"]
    checked = client.request(protocol.InfoReq(rid=client.new_rid(), check_integrity=True)).info
    assert checked["integrity"] == "ok"
    if log_start is not None:
        with open(runtime_process.log_path, "rb") as f:
            f.seek(log_start)
            log = f.read().decode(errors="replace")
        assert "Traceback" not in log, f"a fuzzed message hit an unexpected error:\n{log[-3000:]}"
    print(f"{num_sent} fuzzed messages handled in {elapsed:.2f} s (seed {SEED})")
