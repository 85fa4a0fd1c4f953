"""Issue 20: tcp beyond loopback needs --allow-remote and an auth token; with a token set, only
clients presenting it get a connection (checked at the ZMTP handshake, before any message
reaches the runtime's loop), and a client with a wrong or no token fails at once, naming it."""

import socket
import time

import pytest
import zmq

import sglite as sgl
from sglite import protocol
from sglite.lang.backend.client import ZmqClient
from sglite.launch import RuntimeProcess

TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def remote_runtime():
    port = _free_port()
    with RuntimeProcess(None, timeout=300, load_format="dummy", preset="tiny", dtype="float32",
                        max_total_tokens=512, log_interval=0, address=f"tcp://0.0.0.0:{port}",
                        allow_remote=True, auth_token=TOKEN) as rt:
        yield rt, f"tcp://127.0.0.1:{port}"


def test_non_loopback_bind_warns_and_keeps_the_token_off_the_command_line(remote_runtime):
    rt, _ = remote_runtime
    assert "beyond this machine" in rt.log_tail()
    assert TOKEN not in " ".join(rt.proc.args)


def test_the_right_token_is_served(remote_runtime):
    _, address = remote_runtime
    client = ZmqClient(address, auth_token=TOKEN)
    try:
        out = client.call(protocol.GenerateReq(rid=client.new_rid(), input_ids=[3, 4],
                                               sampling_params={"max_new_tokens": 2,
                                                                "ignore_eos": True}))
        assert isinstance(out, protocol.GenerateOut) and out.meta_info["completion_tokens"] == 2
    finally:
        client.close()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_wrong_or_missing_token_fails_at_once_naming_the_token(remote_runtime, token,
                                                                 monkeypatch):
    _, address = remote_runtime
    monkeypatch.delenv(protocol.AUTH_TOKEN_ENV, raising=False)
    client = ZmqClient(address, auth_token=token)
    start = time.monotonic()
    try:
        with pytest.raises(sgl.RuntimeDied, match="auth token"):
            client.call(protocol.InfoReq(rid=client.new_rid()))
        assert time.monotonic() - start < 5
    finally:
        client.close()


def test_an_unauthenticated_peer_never_reaches_the_loop(remote_runtime):
    rt, address = remote_runtime
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    raw.send(protocol.encode(protocol.InfoReq(rid="sneaky")))
    assert not raw.poll(1000)  # no reply: the handshake never completed
    raw.close()
    client = ZmqClient(address, auth_token=TOKEN)
    try:
        info = client.call(protocol.InfoReq(rid=client.new_rid())).info
        assert info["num_requests"] >= 1  # the earlier test's request; "sneaky" was never seen
    finally:
        client.close()
