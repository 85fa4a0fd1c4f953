"""Issue 20 (adversarial probe): a malformed payload or one bad request never stops the runtime
nor changes other clients' requests; bad sampling values get an error naming the field."""

import math
import time

import msgspec
import pytest

from sglite import protocol
from sglite.lang.backend.client import ZmqClient

OK = {"temperature": 0, "max_new_tokens": 4}


def _error(client, **kw) -> str:
    r = client.generate(**kw)
    assert r["error"] is not None, f"expected an error, got {r}"
    return r["error"]


@pytest.mark.parametrize("payload", [
    b"\x91" * 1000 + b"\xc0",  # arrays nested 1000 deep
    b"\x81\xa1a" * 1000 + b"\xc0",  # maps nested 1000 deep (RecursionError in the decoder)
    b"\xde\xad\xbe\xef garbage",
    msgspec.msgpack.encode({"type": "generate", "rid": 5, "input_ids": "x"}),
    msgspec.msgpack.encode([1, 2, 3]),
])
def test_malformed_payload_is_answered_and_the_runtime_keeps_serving(make_client, runtime_address,
                                                                     runtime_process, payload):
    raw = make_client(runtime_address, alive=runtime_process.is_alive, timeout=60)
    raw.send_raw(payload)
    err = raw.recv()
    assert isinstance(err, protocol.ErrorOut) and "undecodable" in err.message
    assert runtime_process.is_alive()
    other = make_client(runtime_address, alive=runtime_process.is_alive, timeout=120)
    r = other.generate("Hello", sampling_params=OK)
    assert r["error"] is None and r["meta_info"]["completion_tokens"] == 4


def test_bad_ids_fail_only_their_request(client):
    vocab = client.info()["vocab_size"]
    bad = {
        "big_stop": dict(sampling_params={**OK, "min_new_tokens": 2, "stop_token_ids": [vocab + 3]}),
        "neg_stop": dict(sampling_params={**OK, "min_new_tokens": 2, "stop_token_ids": [-1]}),
        "top_logprobs": dict(sampling_params=OK, return_logprob=True, top_logprobs_num=vocab + 1),
        # above the runtime's cap (--max-top-logprobs, 20 by default): each top entry costs the
        # whole batch's steps, so a huge one would slow every bystander
        "many_tops": dict(sampling_params=OK, return_logprob=True, top_logprobs_num=21),
    }
    rids = {}
    for name, kw in bad.items():
        rids[name] = client.new_rid()
        client.send(protocol.GenerateReq(rid=rids[name], text="Hi", **kw))
    good = client.new_rid()
    client.send(protocol.GenerateReq(rid=good, text="Hi", sampling_params=OK))
    results = client.collect([*rids.values(), good])
    assert "stop_token_ids" in results[rids["big_stop"]]["error"]
    assert "stop_token_ids" in results[rids["neg_stop"]]["error"]
    assert "top_logprobs_num" in results[rids["top_logprobs"]]["error"]
    assert "--max-top-logprobs" in results[rids["many_tops"]]["error"]
    assert results[good]["error"] is None and results[good]["meta_info"]["completion_tokens"] == 4


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", math.nan),
    ("frequency_penalty", math.nan), ("frequency_penalty", math.inf), ("frequency_penalty", 2.5),
    ("presence_penalty", math.nan), ("presence_penalty", -math.inf), ("presence_penalty", -3.0),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("top_k", 0), ("top_k", -2),
])
def test_out_of_range_sampling_value_names_the_field(client, field, value):
    assert field in _error(client, text="Hi", sampling_params={**OK, field: value})


def test_huge_prompt_is_refused_unread_and_does_not_stall_a_neighbour(client, make_client,
                                                                      runtime_process):
    neighbour = make_client(runtime_process.address, alive=runtime_process.is_alive)
    start = time.monotonic()
    assert neighbour.generate("Hi", sampling_params=OK)["error"] is None
    alone = time.monotonic() - start
    huge_rid, small_rid = client.new_rid(), neighbour.new_rid()
    client.send(protocol.GenerateReq(rid=huge_rid, text="word " * 3_600_000, sampling_params=OK))
    start = time.monotonic()
    neighbour.send(protocol.GenerateReq(rid=small_rid, text="Hi", sampling_params=OK))
    assert neighbour.collect([small_rid])[small_rid]["error"] is None
    beside = time.monotonic() - start
    err = client.collect([huge_rid])[huge_rid]["error"]
    assert "18000000 characters" in err and "context length" in err
    # tokenizing the 18 MB first held the loop ~10 s; its size is now checked before any work
    assert beside < alone + 2.0, f"the neighbour took {beside:.2f} s (alone {alone:.2f} s)"


@pytest.mark.parametrize("field,value,problem", [
    ("max_new_tokens", 2**64, "2\\*\\*64"), ("stop", object(), "type object"),
    ("stop", ["ok", "\ud800"], "surrogates"),
])
def test_unencodable_values_raise_value_error_naming_the_field(runtime_address, field, value,
                                                               problem):
    client = ZmqClient(runtime_address)
    try:
        with pytest.raises(ValueError, match=rf"sampling_params\['{field}'\].*{problem}"):
            client.request(protocol.GenerateReq(rid=client.new_rid(), text="Hi",
                                                sampling_params={field: value}))
        # nothing was sent, nothing is pending: the client goes on working
        assert client.call(protocol.InfoReq(rid=client.new_rid())).info["vocab_size"] > 0
    finally:
        client.close()
