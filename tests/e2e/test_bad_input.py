"""Bad input gets a clear error to its sender only; the runtime keeps serving everyone."""

import msgspec

from sglite import protocol

OK = {"temperature": 0, "max_new_tokens": 4}


def _error(client, **kw) -> str:
    r = client.generate(**kw)
    assert r["error"] is not None, f"expected an error, got {r}"
    return r["error"]


def test_unknown_sampling_key(client):
    assert "temprature" in _error(client, text="Hi", sampling_params={"temprature": 0.5})


def test_negative_max_new_tokens(client):
    assert "max_new_tokens" in _error(client, text="Hi", sampling_params={"max_new_tokens": -1})


def test_prompt_over_the_context_length(client):
    ctx = client.info()["context_length"]
    msg = _error(client, input_ids=[1] * (ctx + 5), sampling_params=OK)
    assert "context length" in msg and str(ctx + 5) in msg


def test_text_and_input_ids_together(client):
    assert "exactly one" in _error(client, text="Hi", input_ids=[1, 2], sampling_params=OK)


def test_undecodable_message_and_others_keep_being_served(client, make_client, runtime_address):
    other = make_client(runtime_address)
    rid = other.new_rid()
    other.send(protocol.GenerateReq(rid=rid, text="The capital of France is", sampling_params=OK))
    client.send_raw(b"\xc1 this is not msgpack")
    err = client.recv()
    assert isinstance(err, protocol.ErrorOut) and "undecodable" in err.message
    client.send_raw(msgspec.msgpack.encode({"type": "generate", "rid": "x", "stream": "yes"}))
    err = client.recv()
    assert isinstance(err, protocol.ErrorOut) and err.rid == "x" and "stream" in err.message
    # the other client got its answer, and nothing from the bad client's errors
    result = other.collect([rid])[rid]
    assert result["error"] is None and result["meta_info"]["completion_tokens"] == 4
    assert client.generate("Hello", sampling_params=OK)["error"] is None


def test_bad_regex_fails_only_that_request(client):
    bad = client.new_rid()
    good = client.new_rid()
    client.send(protocol.GenerateReq(rid=bad, text="Hi", sampling_params={"regex": "(unclosed"}))
    client.send(protocol.GenerateReq(rid=good, text="Hi", sampling_params=OK))
    results = client.collect([bad, good])
    assert "regex" in results[bad]["error"].lower()
    assert results[good]["error"] is None


def test_a_select_without_choices_is_refused(client):
    reply = client.request(protocol.ScoreReq(rid=client.new_rid(), text="Pick:", choices=[]))
    assert isinstance(reply, protocol.ErrorOut) and "at least one choice" in reply.message
