"""The HTTP process's one connection to the runtime: an asyncio ZeroMQ DEALER.

Every coroutine that sends a request registers an asyncio.Queue under its rid; one reader task
receives replies and puts each into its queue. A ping task sends an InfoReq every `ping_interval`
seconds; its answers keep `info` fresh (the gauges of /metrics, /get_server_info) and show that
the runtime lives. When the runtime has not answered anything for `dead_after` seconds, every
waiter is woken with RuntimeUnavailable and `healthy` turns False until it answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid

import zmq
import zmq.asyncio

from sglite import protocol

logger = logging.getLogger("sglite.http")


class RuntimeUnavailable(RuntimeError):
    """The runtime did not answer (not started yet, busy past the deadline, or gone)."""


class _Dead:
    def __init__(self, message: str):
        self.message = message


class AsyncRuntimeClient:
    def __init__(self, address: str, *, ping_interval: float = 2.0, dead_after: float = 60.0):
        self.address = address
        self.ping_interval, self.dead_after = ping_interval, dead_after
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self._prefix = f"h{os.getpid()}-{uuid.uuid4().hex[:6]}-"
        self._ids = itertools.count()
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        self.info: dict = {}
        self.info_time = 0.0  # monotonic time of the last InfoOut
        self.last_reply = time.monotonic()
        self.healthy = False
        self._info_event: asyncio.Event | None = None

    def new_rid(self, kind: str = "r") -> str:
        return f"{kind}-{self._prefix}{next(self._ids)}"

    async def start(self, timeout: float = 600.0) -> dict:
        """Start the reader and pinger; return the runtime's info once it answers."""
        self._info_event = asyncio.Event()
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._pinger())]
        deadline = time.monotonic() + timeout
        while not self.info:
            await self._send(protocol.InfoReq(rid=self.new_rid("ping")))
            try:
                await asyncio.wait_for(self._info_event.wait(), 1.0)
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeUnavailable(f"the runtime at {self.address} did not answer "
                                             f"within {timeout:.0f} s") from None
        return self.info

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._sock.close(linger=0)
        self._ctx.term()

    # ---- requests
    def open(self, msg) -> asyncio.Queue:
        """Register msg.rid's queue; call `send_registered(msg)` next (or use `request`)."""
        if not self.healthy and self.info:
            raise RuntimeUnavailable(f"the runtime at {self.address} is not answering")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[msg.rid] = q
        return q

    def register(self, rid: str, q: asyncio.Queue) -> None:
        """Deliver rid's replies into q (several rids may share one queue)."""
        if not self.healthy and self.info:
            raise RuntimeUnavailable(f"the runtime at {self.address} is not answering")
        self._queues[rid] = q

    async def send(self, msg) -> None:
        await self._send(msg)

    def abort_soon(self, rids) -> None:
        """Forget rids and send their AbortReqs from a task of their own: callable from a
        `finally` of a cancelled coroutine, where awaiting would be cancelled again."""
        for rid in rids:
            self.forget(rid)
        task = asyncio.get_running_loop().create_task(self._abort_all(list(rids)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _abort_all(self, rids) -> None:
        for rid in rids:
            await self._send(protocol.AbortReq(rid=rid))

    async def request(self, msg) -> asyncio.Queue:
        q = self.open(msg)
        try:
            await self._send(msg)
        except BaseException:  # never sent: nothing will reply
            self.forget(msg.rid)
            raise
        return q

    async def recv(self, q: asyncio.Queue):
        item = await q.get()
        if isinstance(item, _Dead):
            q.put_nowait(item)
            raise RuntimeUnavailable(item.message)
        return item

    def drain(self, q: asyncio.Queue) -> list:
        """Replies already queued (without waiting)."""
        items = []
        while not q.empty():
            item = q.get_nowait()
            if isinstance(item, _Dead):
                q.put_nowait(item)
                break
            items.append(item)
        return items

    async def call(self, msg, timeout: float | None = None):
        q = await self.request(msg)
        try:
            return await asyncio.wait_for(self.recv(q), timeout)
        except asyncio.TimeoutError:
            raise RuntimeUnavailable(f"no reply from the runtime within {timeout} s") from None
        finally:
            self.forget(msg.rid)

    def forget(self, rid: str) -> None:
        self._queues.pop(rid, None)

    def in_flight(self) -> int:
        """Requests whose replies are still routed to a waiter (registered, not yet forgotten)."""
        return len(self._queues)

    async def abort(self, rid: str) -> None:
        self.forget(rid)
        await self._send(protocol.AbortReq(rid=rid))

    async def fresh_info(self, max_age: float = 0.5, timeout: float = 5.0) -> dict:
        """The runtime's info no older than max_age seconds (asks for it when older)."""
        if time.monotonic() - self.info_time > max_age:
            reply = await self.call(protocol.InfoReq(rid=self.new_rid("info")), timeout)
            if isinstance(reply, protocol.InfoOut):
                self._set_info(reply.info)
        return self.info

    # ---- tasks
    async def _send(self, msg) -> None:
        await self._sock.send(protocol.encode(msg))

    async def _reader(self) -> None:
        # one await per burst, not per reply: a shadow (plain) socket drains what has arrived
        sync = zmq.Socket.shadow(self._sock.underlying)
        while True:
            await self._sock.poll(flags=zmq.POLLIN)
            while True:
                try:
                    data = sync.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(data)

    def _on_reply(self, data: bytes) -> None:
        try:
            reply = protocol.decode_reply(data)
        except Exception:
            logger.exception("undecodable reply from the runtime")
            return
        self.last_reply = time.monotonic()
        self.healthy = True
        if isinstance(reply, protocol.InfoOut) and reply.rid.startswith("ping-"):
            self._set_info(reply.info)
            return
        q = self._queues.get(reply.rid)
        if q is not None:  # replies of forgotten rids (aborted streams) are dropped
            q.put_nowait(reply)

    def _set_info(self, info: dict) -> None:
        self.info, self.info_time = info, time.monotonic()
        if self._info_event is not None:
            self._info_event.set()

    async def _pinger(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            await self._send(protocol.InfoReq(rid=self.new_rid("ping")))
            if self.info and time.monotonic() - self.last_reply > self.dead_after:
                if self.healthy:
                    logger.error("the runtime at %s did not answer for %.0f s", self.address,
                                 self.dead_after)
                self.healthy = False
                dead = _Dead(f"the runtime at {self.address} did not answer for "
                             f"{self.dead_after:.0f} s")
                for q in self._queues.values():
                    q.put_nowait(dead)
