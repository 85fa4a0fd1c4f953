"""The front's requests end (their reply routes forgotten, unfinished ones aborted) however their
HTTP response ends. A streamed answer's also when the client is gone before the body's first write
(Starlette then never iterates the body, so the body's own `finally` never runs) and when the
response is cancelled between two writes (the body waits, suspended, for a garbage collection that
may never come soon); a request whose send fails leaves no route behind."""

import asyncio

from sglite import protocol
from sglite.http.front_base import Choice, FrontBase


class _Client:
    """The front's runtime client as far as ending requests goes: who is registered for replies,
    what was aborted."""

    def __init__(self):
        self.registered, self.aborted = set(), []

    def register(self, rid, q):
        self.registered.add(rid)

    def forget(self, rid):
        self.registered.discard(rid)

    def abort_soon(self, rids):
        self.aborted += list(rids)

    async def recv(self, q):
        return await q.get()

    def drain(self, q):
        items = []
        while not q.empty():
            items.append(q.get_nowait())
        return items


class _Metrics:
    """Metrics that record nothing (this test is about the requests' end)."""

    def __getattr__(self, name):
        return self

    def observe(self, *args):
        pass


async def _front_and_response():
    front = FrontBase("tcp://127.0.0.1:9")
    await front.client.close()  # the real client's socket; replies come from the test here
    front.client, front.metrics = _Client(), _Metrics()
    reqs = [protocol.GenerateReq(rid=f"r{i}", text="hi", stream=True) for i in range(2)]
    q, choices = front._start(reqs, "mine")
    first = [protocol.GenerateOut(rid="r0", text="a", finished=False)]
    front._absorb(choices, first)

    def emit(c: Choice):
        yield f"data: {c.text}\n\n"

    response = front._stream_response("generate", q, choices, first, 0.0, emit, user_rid="mine")
    return front, choices, response


def _scope():
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST",
            "path": "/generate", "headers": []}


def test_client_gone_before_the_first_write_ends_the_requests():
    async def run():
        front, _, response = await _front_and_response()

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            raise OSError("connection reset by peer")  # gone at the response's start

        try:
            await response(_scope(), receive, send)
        except Exception:  # noqa: BLE001 (Starlette's ClientDisconnect: the server's business)
            pass
        return front

    front = asyncio.run(run())
    assert front.client.registered == set()
    assert sorted(front.client.aborted) == ["r0", "r1"]
    assert front.user_rids == {}


def test_response_cancelled_between_writes_ends_the_requests_once():
    async def run():
        front, choices, response = await _front_and_response()
        sent = []

        async def receive():
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)
            if message.get("body"):
                await asyncio.sleep(3600)  # the client stopped reading: cancelled below

        task = asyncio.ensure_future(response(_scope(), receive, send))
        while len(sent) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # checked here, while the loop runs: asyncio.run's end would close the body itself
        assert sent[1]["body"] == b"data: a\n\n"
        assert front.client.registered == set()
        front._end(choices, "mine")  # a second end changes nothing
        assert sorted(front.client.aborted) == ["r0", "r1"]  # each aborted once
        assert front.user_rids == {}
        assert response.body_iterator is not None  # the body is still referenced: not collected

    asyncio.run(run())


def test_native_request_forgets_its_rid_when_the_send_fails():
    """/sglite/request registers the reply route before sending; a send that fails (the runtime's
    socket gone) must not leave it registered."""
    import zmq
    from starlette.requests import Request

    from sglite.http.native_routes import NativeRoutes

    async def run():
        front = NativeRoutes("tcp://127.0.0.1:9")
        await front.client.close()  # its socket is gone: the send raises
        body = protocol.encode(protocol.GenerateReq(rid="x", text="hi"))

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request({**_scope(), "path": "/sglite/request"}, receive)
        try:
            await front.native_request(request)
        except zmq.ZMQError:
            pass
        else:
            raise AssertionError("the failed send was not raised")
        return front.client.in_flight()

    assert asyncio.run(run()) == 0


def test_runtime_client_request_forgets_the_route_when_the_send_fails():
    import zmq

    from sglite.http.runtime_client import AsyncRuntimeClient

    async def run():
        client = AsyncRuntimeClient("tcp://127.0.0.1:9")
        await client.close()  # its socket is gone: the send raises
        try:
            await client.request(protocol.InfoReq(rid="i-1"))
        except zmq.ZMQError:
            pass
        else:
            raise AssertionError("the failed send was not raised")
        return client.in_flight()

    assert asyncio.run(run()) == 0
