"""Shared fixtures: ONE runtime process on the embedded default model for every end-to-end test
(`runtime_address`, used by tests/e2e and tests/lang), plus a small protocol client.

Without a GPU the Triton kernels run under the interpreter (tests/kernels, and the runtime's
kernels where a test asks for them). TRITON_INTERPRET must be set before triton and any module
that decorates with @triton.jit are imported, hence here, first: a conftest further down loads
only when pytest reaches its folder, after the test modules collected before it (some import the
sampler, which imports a kernel) had imported triton without it. On a CUDA machine the kernels
compile for real and the `gpu`-marked tests run at real shapes.
"""

from __future__ import annotations

import itertools
import os
import uuid

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

E2E_RUNTIME_ARGS = dict(
    # fp32: batched greedy outputs must equal unbatched ones bit for bit in the e2e tests, and bf16
    # rounding makes near-ties flip with the batch shape.
    dtype="float32",
    max_total_tokens=8192,
    max_running_requests=96,
    chunked_prefill_size=512,
    log_interval=5.0,
)


class _Attached:
    """SGLITE_TEST_RUNTIME=ipc://...: run the e2e tests against a runtime started by hand."""

    def __init__(self, address: str):
        self.address = address

    def is_alive(self) -> bool:
        return True


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The tokenizer the runtime itself uses: the embedded model's converted folder (built once)."""
    from sglite.runtime.models.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="session")
def runtime_process():
    if os.environ.get("SGLITE_TEST_RUNTIME"):
        yield _Attached(os.environ["SGLITE_TEST_RUNTIME"])
        return
    from sglite.launch import RuntimeProcess

    with RuntimeProcess(None, timeout=900, **E2E_RUNTIME_ARGS) as rt:
        yield rt


@pytest.fixture(scope="session")
def runtime_address(runtime_process) -> str:
    return runtime_process.address


class Client:
    """A DEALER speaking sglite.protocol; raises instead of hanging when the runtime dies."""

    _ids = itertools.count()

    def __init__(self, address: str, *, alive=lambda: True, timeout: float = 300.0):
        import zmq

        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.alive, self.timeout = alive, timeout

    def new_rid(self) -> str:
        return f"t{next(self._ids)}-{uuid.uuid4().hex[:6]}"

    def send(self, msg) -> None:
        from sglite import protocol

        self.sock.send(protocol.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout: float | None = None):
        from sglite.launch import wait_reply

        return wait_reply(self.sock, alive=self.alive, timeout=timeout or self.timeout)

    def generate(self, text=None, *, input_ids=None, stream=False, **kw) -> dict:
        """Send one GenerateReq and collect its replies into {"text", "meta_info", "chunks"}."""
        from sglite import protocol

        rid = self.new_rid()
        self.send(protocol.GenerateReq(rid=rid, text=text, input_ids=input_ids, stream=stream, **kw))
        return self.collect([rid])[rid]

    def collect(self, rids) -> dict:
        """Receive until every rid finished (or failed): rid -> result dict."""
        from sglite import protocol

        results = {rid: {"text": "", "chunks": [], "meta_info": {}, "error": None} for rid in rids}
        pending = set(rids)
        while pending:
            reply = self.recv()
            r = results[reply.rid]
            if isinstance(reply, protocol.ErrorOut):
                r["error"] = reply.message
                pending.discard(reply.rid)
                continue
            r["chunks"].append(reply.text)
            r["text"] += reply.text
            r["meta_info"] = reply.meta_info
            if reply.finished:
                pending.discard(reply.rid)
        return results

    def request(self, msg):
        """Send a request that gets exactly one reply (info, flush, score) and return it."""
        self.send(msg)
        reply = self.recv()
        assert reply.rid == msg.rid, f"reply for {reply.rid!r}, expected {msg.rid!r}"
        return reply

    def info(self) -> dict:
        from sglite import protocol

        return self.request(protocol.InfoReq(rid=self.new_rid())).info

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(runtime_process):
    c = Client(runtime_process.address, alive=runtime_process.is_alive)
    yield c
    c.close()


@pytest.fixture
def make_client():
    made = []

    def make(address, **kw):
        made.append(Client(address, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()
