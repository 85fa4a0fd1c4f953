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
