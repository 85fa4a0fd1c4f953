"""The server's admission checks (issue 20, item 6), in process: a real Server and Scheduler on
a tiny random model with a 64-token KV pool, driven one receive at a time from a real DEALER."""

import json
import time
import uuid

import msgspec
import pytest
import zmq

from sglite import protocol
from sglite.runtime.server import limits

OK = {"max_new_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def served():
    from sglite.runtime.executor.model_runner import ModelRunner
    from sglite.runtime.scheduler.scheduler import Scheduler
    from sglite.runtime.server.args import ServerArgs
    from sglite.runtime.server.zmq_server import Server

    runner = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=64,
                         max_running_requests=4)
    scheduler = Scheduler(runner, max_running_requests=4, chunked_prefill_size=32,
                          log_interval=0, enable_overlap=False)
    server = Server(ServerArgs(address=f"ipc:///tmp/sglite-h-{uuid.uuid4().hex[:8]}",
                               device="cpu"), scheduler)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.address)
    yield server, dealer
    dealer.close()
    server.close()


def _ask(served, data: bytes, timeout: float = 30.0):
    server, dealer = served
    dealer.send(data)
    deadline = time.monotonic() + timeout
    while not dealer.poll(0):
        assert time.monotonic() < deadline, "no reply"
        server._receive(block=not server.scheduler.has_work)
        if server.scheduler.has_work:
            server.scheduler.step()
    return protocol.decode_reply(dealer.recv())


def _generate(served, **kw):
    return _ask(served, protocol.encode(protocol.GenerateReq(rid="r1", **kw)))


def test_a_prompt_past_a_small_kv_pool_names_the_pool_not_the_context(served):
    reply = _generate(served, input_ids=[5] * 100, sampling_params=OK)
    assert isinstance(reply, protocol.ErrorOut) and reply.rid == "r1"
    assert "100 tokens" in reply.message and "KV pool holds only 64" in reply.message
    assert "context length is 1024" in reply.message


def test_a_huge_input_ids_list_is_refused_by_its_length_first(served):
    start = time.monotonic()
    reply = _generate(served, input_ids=[10**9] * 2_000_000, sampling_params=OK)
    assert "2000000 tokens" in reply.message  # the length, not the first out-of-vocab id
    assert time.monotonic() - start < 2.0


def test_invalid_utf8_is_answered_with_the_request_id(served):
    data = protocol.encode(protocol.GenerateReq(rid="utf8-rid", text="QQQQ", sampling_params=OK))
    data = data.replace(b"QQQQ", b"Q\xff\xfeQ")
    reply = _ask(served, data)
    assert isinstance(reply, protocol.ErrorOut) and reply.rid == "utf8-rid"
    assert "UTF-8" in reply.message


def _deep_schema(levels: int) -> str:
    s: dict = {"type": "integer"}
    for _ in range(levels):
        s = {"type": "array", "items": s}
    return json.dumps(s)


@pytest.mark.parametrize("field,spec,depth", [
    ("json_schema", _deep_schema(150), 151),
    ("grammar", "start: " + "(" * 120 + '"a"' + ")" * 120, 120),
])
def test_deeply_nested_grammars_are_refused_before_compiling(served, field, spec, depth):
    reply = _generate(served, input_ids=[5, 6], sampling_params={**OK, field: spec})
    assert isinstance(reply, protocol.ErrorOut) and reply.rid == "r1"
    assert f"{field} is nested {depth} levels deep" in reply.message
    # a shallow one passes this check (and meets the next: no tokenizer in this runtime)
    shallow = _deep_schema(3) if field == "json_schema" else 'start: ("a")'
    reply = _generate(served, input_ids=[5, 6], sampling_params={**OK, field: shallow})
    assert "nested" not in reply.message and "tokenizer" in reply.message


def test_nesting_measures_skip_strings_regexes_and_comments():
    assert limits.json_nesting('{"a": "[[[[{{{", "b": [1, {"c": "\\"]["}]}') == 3
    assert limits.lark_nesting('start: "((((" /[(]+\\/(/ x  // ((((\nx: ("a" | ["b"])') == 2


def test_recover_rid_reads_the_id_of_an_undecodable_message():
    enc = msgspec.msgpack.encode
    assert limits.recover_rid(enc({"type": "generate", "rid": "abc", "x": b"\xff"})) == "abc"
    assert limits.recover_rid(enc({"rid": "r" * 40})) == "r" * 40  # str8
    assert limits.recover_rid(b"\x81\xa3rid\xa5ab") == ""  # truncated
    assert limits.recover_rid(b"garbage") == ""
