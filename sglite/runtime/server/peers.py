"""Which clients are still connected, learned from the socket itself (issue 20, item 3).

A ROUTER reports a vanished peer only when a send to it fails, which for a non-streaming request
comes at its end. ZeroMQ's socket monitor reports every closed connection at once (a client that
exited, was SIGKILLed, or missed the transport heartbeats), but by file descriptor, not by client
identity; every received message names the descriptor it came in on (SRCFD). `PeerTracker` joins
the two: a descriptor's last sender is its owner, and a closed descriptor ends its owner.

Descriptors are reused, so the order matters: a closed connection's DISCONNECTED event is queued
before its descriptor is closed, hence before a new connection can get that descriptor and before
any message of that new connection can be read. `sort` therefore takes messages already read and
drains the monitor after them: every event that precedes those messages is then in hand, and the
events are applied before the messages name new owners. Messages from a connection that closed in
the same round (its descriptor's last event is DISCONNECTED) are dropped with their sender.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import parse_monitor_message

GONE_MEMORY_S = 600.0  # how long a gone identity's late messages are still recognised and dropped


class PeerTracker:
    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._owner: dict[int, bytes] = {}  # descriptor -> identity of the last message on it
        self._gone: dict[bytes, float] = {}  # identity -> when its connection closed

    def is_gone(self, identity: bytes) -> bool:
        return identity in self._gone

    def mark_gone(self, identity: bytes) -> bool:
        """Record a vanished client (also when a send to it failed); False if known already."""
        if identity in self._gone:
            return False
        self._gone[identity] = time.monotonic()
        return True

    def receive(self) -> tuple[list[tuple[bytes, list]], list[bytes]]:
        """Every message waiting on the ROUTER socket, then the monitor (`sort`): ((identity,
        frames) to handle, identities that went away)."""
        batch = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            batch.append((frames[0].bytes, _source_fd(frames[-1]), frames))
        return self.sort(batch)

    def sort(self, batch: list[tuple[bytes, int | None, list]]) -> tuple[list, list[bytes]]:
        """batch: (identity, descriptor or None, frames) for messages read before this call.
        Returns (the messages to handle, the identities that went away)."""
        gone: list[bytes] = []
        last_closed: dict[int, bool] = {}  # descriptor -> its last event this round was a close
        for event, fd in self._drain_monitor():
            last_closed[fd] = event == zmq.EVENT_DISCONNECTED
            if event == zmq.EVENT_DISCONNECTED and fd in self._owner:
                gone.append(self._owner.pop(fd))
        keep = []
        for identity, fd, frames in batch:
            if identity in self._gone or identity in gone:
                continue
            if fd is not None and last_closed.get(fd):  # every connection on fd is closed now
                gone.append(identity)
                continue
            if fd is not None:
                self._owner[fd] = identity
            keep.append((identity, frames))
        gone = list(dict.fromkeys(g for g in gone if self.mark_gone(g)))
        self._forget_old()
        return keep, gone

    def close(self) -> None:
        self.monitor.close(linger=0)

    # ---- private
    def _drain_monitor(self):
        while True:
            try:
                msg = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            yield msg["event"], msg["value"]

    def _forget_old(self) -> None:
        if len(self._gone) < 1024:
            return
        cutoff = time.monotonic() - GONE_MEMORY_S
        self._gone = {k: t for k, t in self._gone.items() if t > cutoff}


def _source_fd(frame: zmq.Frame) -> int | None:
    try:
        return frame.get(zmq.SRCFD)  # the connection's descriptor (not for inproc peers)
    except zmq.ZMQError:
        return None
