"""The ZMQ client raises instead of hanging when the runtime dies (a silent in-process ROUTER
stands in for a runtime that stopped answering)."""

import threading
import time
import uuid

import pytest
import zmq

import sglite as sgl
from sglite import protocol
from sglite.lang.ir import GenParams


class SilentRuntime:
    """Answers InfoReq while `answering`, swallows everything else."""

    def __init__(self):
        self.address = f"ipc:///tmp/sglite-test-{uuid.uuid4().hex[:8]}"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind(self.address)
        self.answering, self.stop = True, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, data = self.sock.recv_multipart()
            msg = protocol.decode_request(data)
            if self.answering and isinstance(msg, protocol.InfoReq):
                self.sock.send_multipart([identity, protocol.encode(
                    protocol.InfoOut(rid=msg.rid, info={"chat_template": None}))])

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close(linger=0)


@pytest.fixture
def silent():
    rt = SilentRuntime()
    yield rt
    rt.close()


def test_attached_endpoint_raises_when_pings_go_unanswered(silent):
    endpoint = sgl.RuntimeEndpoint(silent.address, timeout=1.0)
    silent.answering = False
    start = time.monotonic()
    with pytest.raises(sgl.RuntimeDied, match="did not answer"):
        list(endpoint.generate("hi", GenParams(max_tokens=2)))
    assert time.monotonic() - start < 10
    endpoint.shutdown()


def test_owned_runtime_that_exits_wakes_every_waiter(silent):
    alive = [True]
    endpoint = sgl.RuntimeEndpoint(silent.address, _is_alive=lambda: alive[0])

    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("a")

    states = [prog.run(backend=endpoint) for _ in range(3)]
    alive[0] = False
    for state in states:
        with pytest.raises(RuntimeError, match="exited"):
            state["a"]
    with pytest.raises(sgl.RuntimeDied):  # later requests fail at once
        endpoint.get_server_info()
    endpoint.shutdown()



def test_a_dealer_without_a_peer_never_stalls_the_client(monkeypatch):
    """A DEALER with no pipe (a runtime that refused the handshake: libzmq drops the pipe and
    stops reconnecting) cannot take a message; the client's I/O thread once sent blocking and
    stalled there, so neither its pings nor the monitor's handshake-failed event could wake the
    waiter (a full-suite run hung in test_bad_input_auth). Here the DEALER never connects at all:
    the request waits in the thread's outbox and the unanswered pings fail it."""
    from sglite.lang.backend.client import ZmqClient

    connect = zmq.Socket.connect
    monkeypatch.setattr(zmq.Socket, "connect",
                        lambda self, addr: connect(self, addr) if addr.startswith("inproc://") else None)
    client = ZmqClient("tcp://127.0.0.1:9", ping_interval=0.2, dead_after=0.5)
    monkeypatch.undo()
    result = []

    def call():
        try:
            client.call(protocol.InfoReq(rid=client.new_rid()))
        except sgl.RuntimeDied as e:
            result.append(e)

    waiter = threading.Thread(target=call, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    try:
        assert not waiter.is_alive(), "the call hung"
        assert result and "did not answer" in str(result[0])
    finally:
        client.close()
