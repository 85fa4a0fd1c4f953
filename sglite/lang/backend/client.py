"""One ZMQ DEALER per backend, owned by one I/O thread; replies are dispatched by rid.

ZMQ sockets are not thread-safe, so program threads never touch the DEALER: they push encoded
requests into an inproc PUSH socket (under a lock), and the I/O thread forwards them, receives
replies and puts each into the queue registered for its rid. A dead runtime is noticed here, not
in the waiting threads, and every waiter is then woken with RuntimeDied:
- the socket monitor reports the connection closing: a runtime that exits or is killed closes it
  at once (measured on the loaded 2-core box: waiters raise 0.07 s after a SIGKILL);
- ZMTP heartbeats every `heartbeat_interval` s close the connection when the runtime answers none
  for `heartbeat_timeout` s (a stopped or frozen runtime); libzmq's I/O thread in the runtime
  answers them, not its scheduler loop, so a long forward step never looks like a dead runtime;
- an owned runtime through `is_alive()`;
- InfoReq pings (answered by the scheduler loop, between steps) that go unanswered for
  `dead_after` seconds: a runtime whose loop hangs, or an address nothing ever accepted.
A connection that closed is final: the runtime aborts the requests of a closed connection, so
none of them can finish, and the client raises RuntimeDied from then on.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
import time
import uuid

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from sglite import protocol

POLL_MS = 200
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class RuntimeDied(RuntimeError):
    """The runtime stopped answering (its process exited, or pings went unanswered)."""


class _Dead:
    def __init__(self, message: str):
        self.message = message


class ReplyQueues:
    """What every runtime client shares: request ids, and one queue of replies per request
    (a `_Dead` in it: the runtime is gone). Subclasses fill `_queues` and implement request,
    send, forget and close."""

    def _init_queues(self) -> None:
        self._rid_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}-"
        self._rid_counter = itertools.count()
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()

    def new_rid(self, kind: str = "r") -> str:
        return f"{kind}-{self._rid_prefix}{next(self._rid_counter)}"

    def recv(self, q: queue.Queue):
        item = q.get()
        if isinstance(item, _Dead):
            q.put(item)  # later recv calls on this queue fail the same way
            raise RuntimeDied(item.message)
        return item

    def call(self, msg):
        """Send one request and return its single reply."""
        q = self.request(msg)
        try:
            return self.recv(q)
        finally:
            self.forget(msg.rid)


class ZmqClient(ReplyQueues):
    def __init__(self, address: str, *, is_alive=None, ping_interval: float = 5.0,
                 dead_after: float = 120.0, heartbeat_interval: float = 0.5,
                 heartbeat_timeout: float = 2.0, auth_token: str | None = None):
        self.address = address
        self._is_alive = is_alive
        self._ping_interval, self._dead_after = ping_interval, dead_after
        self._heartbeat_timeout = heartbeat_timeout
        self._ctx = zmq.Context.instance()
        self._init_queues()
        self._dead: str | None = None
        self._closed = threading.Event()
        wake = f"inproc://sglite-client-{self._rid_prefix}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(wake)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(wake)
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_interval * 1000))
        self._dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_timeout * 1000))
        apply_auth(self._dealer, auth_token)
        self._monitor = self._dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        self._dealer.connect(address)
        self._thread = threading.Thread(target=self._loop, name="sglite-zmq", daemon=True)
        self._thread.start()

    def request(self, msg) -> queue.Queue:
        """Send msg and return the queue its replies arrive on (call `forget(rid)` when done).
        Raises ValueError naming the field when msg cannot be encoded (an int past 64 bits, an
        object msgpack has no type for, a lone surrogate)."""
        data = encode_naming_field(msg)
        q: queue.Queue = queue.Queue()
        with self._lock:
            if self._dead is not None:
                raise RuntimeDied(self._dead)
            self._queues[msg.rid] = q
            self._push.send(data)
        return q

    def send(self, msg) -> None:
        """Fire and forget (AbortReq)."""
        data = encode_naming_field(msg)
        with self._lock:
            if self._dead is None and not self._closed.is_set():
                self._push.send(data)

    def forget(self, rid: str) -> None:
        with self._lock:
            self._queues.pop(rid, None)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._thread.join(timeout=2)
            with self._lock:
                self._dealer.disable_monitor()
                for sock in (self._push, self._pull, self._monitor, self._dealer):
                    sock.close(linger=0)

    # ---- the I/O thread --------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        # requests the DEALER could not take yet: it has no connected peer before the handshake
        # completes (or ever, when the runtime refuses it), and a blocking send there would stall
        # this thread, so that the monitor's handshake-failed event never woke the waiters
        outbox: collections.deque[bytes] = collections.deque()
        last_recv, ping_sent_at = time.monotonic(), None
        while not self._closed.is_set():
            events = dict(poller.poll(POLL_MS))
            while self._pull in events and self._pull.poll(0):
                outbox.append(self._pull.recv())
            if outbox and self._send_waiting(outbox):
                poller.modify(self._dealer, zmq.POLLIN | zmq.POLLOUT)  # wake when a peer can take them
            else:
                poller.modify(self._dealer, zmq.POLLIN)
            replies = bool(events.get(self._dealer, 0) & zmq.POLLIN)
            if replies:  # before the monitor: replies that made it still count
                while self._dealer.poll(0):
                    self._dispatch(protocol.decode_reply(self._dealer.recv()))
                last_recv, ping_sent_at = time.monotonic(), None
            if self._monitor in events:
                event = parse_monitor_message(self._monitor.recv_multipart())["event"]
                self._lost_connection(refused=bool(event & HANDSHAKE_FAILED))
            if replies:
                continue
            now = time.monotonic()
            if self._dead is not None or not self._queues:
                last_recv = now
                continue
            if self._is_alive is not None and not self._is_alive():
                self._fail("the runtime process exited")
            elif ping_sent_at is None and now - last_recv > self._ping_interval:
                ping_sent_at = now
                outbox.append(protocol.encode(protocol.InfoReq(rid=self.new_rid("ping"))))
                self._send_waiting(outbox)
            elif ping_sent_at is not None and now - ping_sent_at > self._dead_after:
                self._fail(f"the runtime at {self.address} did not answer for {self._dead_after:.0f} s")

    def _send_waiting(self, outbox: collections.deque) -> bool:
        """Hand queued requests to the DEALER without blocking, in order; whether some still
        wait (none once the client is dead: their waiters got RuntimeDied already)."""
        while outbox and self._dead is None:
            try:
                self._dealer.send(outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                return True
            outbox.popleft()
        outbox.clear()
        return False

    def _lost_connection(self, *, refused: bool = False) -> None:
        if self._dead is not None:
            return
        if refused:
            self._fail(f"the runtime at {self.address} refused the connection: its auth token "
                       f"differs from this client's (auth_token= or ${protocol.AUTH_TOKEN_ENV})")
        elif self._is_alive is not None and not self._is_alive():
            self._fail("the runtime process exited")
        else:
            self._fail(f"the connection to the runtime at {self.address} closed: its process "
                       f"exited, or it answered no heartbeat for {self._heartbeat_timeout:.1f} s")

    def _dispatch(self, reply) -> None:
        with self._lock:
            q = self._queues.get(reply.rid)
        if q is not None:  # replies for forgotten rids (pings, aborted streams) are dropped
            q.put(reply)

    def _fail(self, message: str) -> None:
        with self._lock:
            self._dead = message
            for q in self._queues.values():
                q.put(_Dead(message))


def apply_auth(sock: zmq.Socket, token: str | None = None) -> None:
    """Present the runtime's auth token (default: $SGLITE_AUTH_TOKEN) as ZMTP PLAIN credentials;
    call before connect. Without a token the socket connects unauthenticated."""
    token = token or os.environ.get(protocol.AUTH_TOKEN_ENV)
    if token:
        sock.plain_username = protocol.AUTH_USERNAME.encode()
        sock.plain_password = token.encode()


def encode_naming_field(msg) -> bytes:
    """protocol.encode(msg), or ValueError naming the first field (path) that cannot be encoded."""
    try:
        return protocol.encode(msg)
    except (TypeError, ValueError, OverflowError) as e:
        path, value = _first_unencodable(msg, type(msg).__name__)
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise ValueError(f"cannot send {path}={text}: {e}") from None


def _first_unencodable(value, path: str) -> tuple[str, object]:
    if isinstance(value, msgspec.Struct):
        items = [(f"{path}.{f}", getattr(value, f)) for f in value.__struct_fields__]
    elif isinstance(value, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return path, value
    for sub_path, sub in items:
        try:
            protocol.encode(sub)
        except (TypeError, ValueError, OverflowError):
            return _first_unencodable(sub, sub_path)
    return path, value  # (a dict key itself cannot be encoded)
