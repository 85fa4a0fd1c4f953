"""PeerTracker on real sockets: a closed client connection names its client, also when the next
client gets the same file descriptor, and messages of a closed connection are dropped."""

import time
import uuid

import pytest
import zmq

from sglite.runtime.server.peers import PeerTracker, _source_fd


@pytest.fixture
def router():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    peers = PeerTracker(sock)
    address = f"ipc:///tmp/sglite-peers-{uuid.uuid4().hex[:8]}"
    sock.bind(address)
    yield ctx, sock, peers, address
    peers.close()
    sock.close()
    ctx.term()


def _round(sock, peers, *, wait: float = 0.3):
    """Read what arrives within `wait` s, then sort it: (messages kept, identities gone)."""
    batch, deadline = [], time.monotonic() + wait
    while time.monotonic() < deadline:
        if sock.poll(10):
            frames = sock.recv_multipart(copy=False)
            batch.append((frames[0].bytes, _source_fd(frames[-1]), frames))
    _round.fds = {frames[1].bytes: fd for _, fd, frames in batch}  # data -> descriptor
    kept, gone = peers.sort(batch)
    return [(identity, frames[1].bytes) for identity, frames in kept], gone


def _dealer(ctx, address):
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(address)
    return d


def test_a_closed_connection_names_its_client_and_fd_reuse_does_not_fool_it(router):
    ctx, sock, peers, address = router
    a, b = _dealer(ctx, address), _dealer(ctx, address)
    a.send(b"from a")
    b.send(b"from b")
    kept, gone = _round(sock, peers)
    ids = {data: identity for identity, data in kept}
    fd_of_a = _round.fds[b"from a"]
    assert set(ids) == {b"from a", b"from b"} and gone == []
    a.close()
    kept, gone = _round(sock, peers)
    assert kept == [] and gone == [ids[b"from a"]]
    # the next client gets a's descriptor; it is alive and must not be reported gone
    c = _dealer(ctx, address)
    c.send(b"from c")
    kept, gone = _round(sock, peers)
    assert _round.fds[b"from c"] == fd_of_a
    assert [data for _, data in kept] == [b"from c"] and gone == []
    b.close()
    kept, gone = _round(sock, peers)
    assert gone == [ids[b"from b"]]
    c.send(b"still here")
    kept, gone = _round(sock, peers)
    assert [data for _, data in kept] == [b"still here"] and gone == []
    c.close()
    assert peers.is_gone(ids[b"from a"]) and not peers.mark_gone(ids[b"from a"])


def test_messages_of_a_connection_closed_in_the_same_round_are_dropped(router):
    ctx, sock, peers, address = router
    a = _dealer(ctx, address)
    a.send(b"hello")
    kept, _ = _round(sock, peers)
    identity = kept[0][0]
    a.send(b"last words")
    time.sleep(0.2)  # the message is queued at the router ...
    a.close()
    time.sleep(0.2)  # ... and the close is on the monitor before this round reads either
    kept, gone = _round(sock, peers, wait=0.05)
    assert gone == [identity] and kept == []
