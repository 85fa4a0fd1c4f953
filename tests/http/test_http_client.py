"""HttpClient (sglite/lang/backend/http_client.py): ZmqClient's interface over the HTTP front's
/sglite/* routes, the same protocol messages, against the live server; and a frontend program
run through it."""

import time

import pytest

import sglite as sgl
from sglite import protocol
from sglite.lang.backend.client import RuntimeDied
from sglite.lang.backend.http_client import HttpClient

API_KEY = "sk-sglite-test"  # the key tests/http/conftest.py starts the server with
GREEDY = {"temperature": 0, "max_new_tokens": 6}


@pytest.fixture
def hc(http_server):
    c = HttpClient(http_server.url, api_key=API_KEY)
    yield c
    c.close()


def _collect(client, q):
    chunks = []
    while True:
        out = client.recv(q)
        assert isinstance(out, protocol.GenerateOut), out
        chunks.append(out)
        if out.finished:
            return chunks


def test_protocol_messages_over_http(hc, client):
    info = hc.call(protocol.InfoReq(rid=hc.new_rid("info")))
    assert isinstance(info, protocol.InfoOut) and info.info["max_total_tokens"] == 8192
    rid = hc.new_rid("gen")
    q = hc.request(protocol.GenerateReq(rid=rid, text="The capital of France is", stream=True,
                                        sampling_params=GREEDY))
    chunks = _collect(hc, q)
    hc.forget(rid)
    assert all(c.rid == rid for c in chunks) and len(chunks) > 1
    # the same text as the runtime gives over ZeroMQ (tests/conftest.py's protocol client)
    direct = client.generate("The capital of France is", sampling_params=GREEDY)
    assert "".join(c.text for c in chunks) == direct["text"]
    score = hc.call(protocol.ScoreReq(rid=hc.new_rid("score"), text="The sky is",
                                      choices=[" blue", " green"]))
    assert isinstance(score, protocol.ScoreOut) and len(score.token_logprobs) == 2
    err = hc.call(protocol.GenerateReq(rid=hc.new_rid("bad"), text="x",
                                       sampling_params={"temprature": 1}))
    assert isinstance(err, protocol.ErrorOut) and "temprature" in err.message


def test_forget_and_abort_free_the_request(hc, http):
    long = {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}
    for how in ("forget", "abort"):
        rid = hc.new_rid(how)
        q = hc.request(protocol.GenerateReq(rid=rid, text="Once upon a time", stream=True,
                                            sampling_params=long))
        assert isinstance(hc.recv(q), protocol.GenerateOut)
        if how == "abort":
            hc.send(protocol.AbortReq(rid=rid))
            chunks = _collect(hc, q)
            assert chunks[-1].meta_info["finish_reason"]["type"] == "abort"
        hc.forget(rid)
        deadline = time.monotonic() + 30
        while http.get("/get_server_info").json()["num_running_reqs"]:
            assert time.monotonic() < deadline, f"{how}: the request kept running"
            time.sleep(0.1)
    assert http.get("/get_server_info").json()["kv_held_by_running"] == 0


def test_wrong_key_and_dead_server(http_server):
    bad = HttpClient(http_server.url, api_key="nope")
    reply = bad.call(protocol.InfoReq(rid=bad.new_rid()))
    assert isinstance(reply, protocol.ErrorOut) and "API key" in reply.message
    bad.close()
    from sglite.http.launch import free_port

    nobody = HttpClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(RuntimeDied, match="failed"):
        nobody.call(protocol.InfoReq(rid=nobody.new_rid()))
    nobody.close()


def test_a_program_runs_over_http(http_server, runtime_process, monkeypatch):
    monkeypatch.setenv("SGLITE_API_KEY", API_KEY)  # HttpClient's key when none is passed
    endpoint = sgl.RuntimeEndpoint(runtime_process.address, _is_alive=runtime_process.is_alive)
    # RuntimeEndpoint("http://...") will build exactly this (runtime_endpoint.py picks the client
    # by the address's scheme); built by hand here so this test does not depend on that dispatch
    backend = sgl.RuntimeEndpoint.__new__(sgl.RuntimeEndpoint)
    backend.client = HttpClient(http_server.url)
    backend.info = backend.get_server_info()
    backend.chat_template_name, backend._chat_template = None, None

    @sgl.function
    def qa(s, q):
        s += "Q: " + q + "\nA:" + sgl.gen("a", max_tokens=6, temperature=0, stop="\n")
        s += " Is that right?" + sgl.select("yes", choices=[" yes", " no"])

    try:
        over_http = qa.run(q="What is the capital of France?", backend=backend)
        over_zmq = qa.run(q="What is the capital of France?", backend=endpoint)
        assert over_http["a"] == over_zmq["a"] and over_http["yes"] == over_zmq["yes"]
        assert over_http.text() == over_zmq.text()
    finally:
        backend.shutdown()
        endpoint.shutdown()
