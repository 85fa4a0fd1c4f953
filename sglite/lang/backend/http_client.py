"""HttpClient: ZmqClient's interface (new_rid, request, send, recv, call, forget, close) over HTTP,
so that `sgl.RuntimeEndpoint("http://host:port")` reaches a runtime through its HTTP front.

The same protocol messages travel: `request(msg)` POSTs msgpack(msg) to /sglite/request and a
reader thread splits the streamed response into its replies (each framed by a 4-byte big-endian
length) and puts them on the rid's queue. `forget(rid)` of an unfinished stream closes its
connection, and the HTTP front aborts the request (its KV is freed). `send(AbortReq)` POSTs to
/sglite/send. A server that cannot be reached, or a stream cut short, wakes the waiter with
RuntimeDied, as a dead runtime does over ZeroMQ. The API key (the server's --api-key) comes from
`api_key=` or the SGLITE_API_KEY environment variable.
"""

from __future__ import annotations

import os
import queue
import struct
import threading

import httpx

from sglite import protocol
from sglite.lang.backend.client import ReplyQueues, RuntimeDied, _Dead


class HttpClient(ReplyQueues):
    def __init__(self, address: str, *, api_key: str | None = None, connect_timeout: float = 10.0,
                 is_alive=None, **_ignored):
        self.address = address.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("SGLITE_API_KEY")
        headers = {"Content-Type": "application/x-msgpack"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # no pool limit: every running request holds one streamed response
        self._http = httpx.Client(
            base_url=self.address, headers=headers,
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._init_queues()
        self._responses: dict[str, httpx.Response] = {}
        self._closed = False

    def request(self, msg) -> queue.Queue:
        """Send msg and return the queue its replies arrive on (call `forget(rid)` when done)."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            if self._closed:
                raise RuntimeDied(f"the client of {self.address} is closed")
            self._queues[msg.rid] = q
        threading.Thread(target=self._stream, args=(msg, q), daemon=True,
                         name="sglite-http").start()
        return q

    def send(self, msg) -> None:
        """Fire and forget (AbortReq)."""
        if self._closed:
            return
        try:
            self._http.post("/sglite/send", content=protocol.encode(msg))
        except httpx.HTTPError:
            pass

    def forget(self, rid: str) -> None:
        with self._lock:
            self._queues.pop(rid, None)
            resp = self._responses.pop(rid, None)
        if resp is not None:
            resp.close()  # an unfinished stream: the server aborts the request

    def close(self) -> None:
        with self._lock:
            self._closed = True
            responses = list(self._responses.values())
            self._responses.clear()
        for resp in responses:
            resp.close()
        self._http.close()

    # ---- the reader threads
    def _stream(self, msg, q: queue.Queue) -> None:
        rid = msg.rid
        try:
            with self._http.stream("POST", "/sglite/request", content=protocol.encode(msg)) as resp:
                if resp.status_code != 200:
                    resp.read()
                    q.put(protocol.ErrorOut(rid=rid, message=_error_message(resp)))
                    return
                with self._lock:
                    if rid not in self._queues:
                        return
                    self._responses[rid] = resp
                buf = b""
                for data in resp.iter_bytes():
                    buf += data
                    while len(buf) >= 4:
                        (n,) = struct.unpack(">I", buf[:4])
                        if len(buf) < 4 + n:
                            break
                        reply = protocol.decode_reply(buf[4:4 + n])
                        buf = buf[4 + n:]
                        q.put(reply)
                if buf:
                    q.put(_Dead(f"the stream from {self.address} ended inside a message"))
        except httpx.HTTPError as e:
            with self._lock:
                gone = rid not in self._queues or self._closed
            if not gone:  # not our own close(): the server went away
                q.put(_Dead(f"the HTTP server at {self.address} failed: {type(e).__name__}: {e}"))
        finally:
            with self._lock:
                self._responses.pop(rid, None)


def _error_message(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except Exception:
        return f"HTTP {resp.status_code}: {resp.text[:500]}"
