"""The router loop: one ZeroMQ ROUTER for clients, one DEALER per replica, one thread.

Clients speak `sglite.protocol` to the router exactly as to a runtime. Each request gets a
router-wide rid (client rids are unique per client only) and goes to one replica:
- GenerateReq / ScoreReq: to the replica `CacheAwarePolicy` picks for its prompt; its
  replies come back with the client's rid, and the last one (finished GenerateOut, ScoreOut,
  ErrorOut) ends it;
- AbortReq: to the replica that holds the request (the request then answers for itself);
- InfoReq / FlushCacheReq: to every live replica; one merged reply (counters summed, each
  replica's own info under "replicas"; a flush is Ok only when every replica flushed).
A replica that dies (its process exits, or its connection closes: SIGKILL closes it at once, a
frozen one misses the ZMTP heartbeats) fails its outstanding requests with an ErrorOut naming it;
the others keep serving. A client that goes away has its requests aborted at their replicas
(`PeerTracker`, as in the runtime). Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from sglite import protocol
from sglite.runtime.router.policy import CacheAwarePolicy, ReplicaState, RoutingConfig
from sglite.runtime.server.peers import PeerTracker

logger = logging.getLogger("sglite.router")

POLL_MS = 100
CHECK_EVERY_S = 0.2  # owned replica processes and the launching process are polled this often
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000  # as the runtime's towards its clients
# info keys that describe the model or one process, taken from the first live replica, not summed
_SAME_KEYS = {"model_path", "context_length", "vocab_size", "eos_token_id", "eos_token_ids",
              "chat_template", "bos_token", "eos_token", "disable_radix_cache",
              "cuda_graph_max_bs", "pid", "integrity"}


class Replica(ReplicaState):
    """A replica's socket and process beside what the policy knows of it."""

    def __init__(self, index: int, address: str, ctx: zmq.Context, process=None):
        super().__init__(index)
        self.address, self.process = address, process  # process: a RuntimeProcess, or None
        self.socket = ctx.socket(zmq.DEALER)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0),
                           (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS),
                           (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)):
            self.socket.setsockopt(opt, value)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)
        self.closed = False
        self.death: str | None = None  # why it is dead

    @property
    def name(self) -> str:
        return f"replica {self.index} ({self.address})"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


@dataclass
class Pending:
    """A routed request: who asked, under which rid, and where it went."""

    client: bytes
    rid: str  # the client's rid
    replica: Replica


@dataclass
class Gather:
    """An InfoReq / FlushCacheReq sent to every live replica, waiting for their replies."""

    client: bytes
    msg: Any  # the client's InfoReq or FlushCacheReq
    waiting: set[int]
    replies: dict[int, Any] = field(default_factory=dict)  # replica index -> reply (None: died)


class Router:
    def __init__(self, address: str, replica_addresses: list[str], *, processes=None,
                 config: RoutingConfig | None = None):
        self.address = address
        self.ctx = zmq.Context()
        processes = processes or [None] * len(replica_addresses)
        self.replicas = [Replica(i, a, self.ctx, p)
                         for i, (a, p) in enumerate(zip(replica_addresses, processes))]
        self.policy = CacheAwarePolicy(self.replicas, config)
        self.front = self.ctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, 0), (zmq.LINGER, 0),
                           (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS),
                           (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)):
            self.front.setsockopt(opt, value)
        self.peers = PeerTracker(self.front)
        self.front.bind(address)
        self._rids = itertools.count()
        self.pending: dict[str, Pending] = {}  # router rid -> request
        self.by_client: dict[tuple[bytes, str], str] = {}  # (client, client rid) -> router rid
        self.gather_parts: dict[str, tuple[Gather, int]] = {}  # router rid -> (gather, replica)
        self.poller = zmq.Poller()
        self.stopping = False
        self._last_check = 0.0
        self._parent_pid = int(os.environ.get("SGLITE_PARENT_PID", "0")) or None

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        logger.info("sglite router ready at %s in front of %d replicas", self.address,
                    len(self.replicas))
        self.poller.register(self.front, zmq.POLLIN)
        # a client's closed connection must be seen with no other message arriving
        self.poller.register(self.peers.monitor, zmq.POLLIN)
        for r in self.replicas:
            self.poller.register(r.socket, zmq.POLLIN)
            self.poller.register(r.monitor, zmq.POLLIN)
        try:
            while not self.stopping:
                events = dict(self.poller.poll(POLL_MS))
                for r in self.replicas:
                    if r.alive and r.socket in events:
                        self._relay_replies(r)
                    if r.alive and r.monitor in events:  # only EVENT_DISCONNECTED is subscribed
                        self._replica_died(r, "its connection closed")
                if self.front in events or self.peers.monitor in events:
                    self._receive()
                self._check_processes()
        finally:
            self.close()

    def close(self) -> None:
        owned = [r.process for r in self.replicas if r.process is not None]
        for p in owned:  # all at once: each takes up to a scheduler step to stop
            if p.is_alive():
                p.proc.terminate()
        for r in self.replicas:
            r.close()
        for p in owned:
            p.shutdown()
        self.peers.close()
        self.front.close(linger=0)
        self.ctx.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except OSError:
                pass

    # ---- clients -> replicas
    def _receive(self) -> None:
        batch, gone = self.peers.receive()
        for identity in gone:
            self._client_gone(identity)
        for identity, frames in batch:
            if len(frames) != 2:
                self._send(identity, protocol.ErrorOut(rid="", message=(
                    f"expected one frame per message, got {len(frames) - 1}")))
                continue
            try:
                self._handle(identity, frames[1].bytes)
            except Exception:  # one bad message must never end the router
                logger.exception("routing a message failed; dropped it")

    def _handle(self, identity: bytes, data: bytes) -> None:
        try:
            msg = protocol.decode_request(data)
        except Exception as e:  # the runtime's answer to an undecodable message, word for word
            self._send(identity, protocol.ErrorOut(
                rid=_guess_rid(data), message=f"undecodable message: {type(e).__name__}: {e}"))
            return
        if isinstance(msg, protocol.AbortReq):
            self._abort(identity, msg.rid)
        elif isinstance(msg, (protocol.InfoReq, protocol.FlushCacheReq)):
            self._scatter(identity, msg)
        else:
            self._route(identity, msg)

    def _route(self, identity: bytes, msg) -> None:
        if (identity, msg.rid) in self.by_client:
            self._send(identity, protocol.ErrorOut(rid=msg.rid, message=(
                f"request id {msg.rid!r} is already in use by a running request")))
            return
        replica = self.policy.choose(routing_key(msg))
        if replica is None:
            self._send(identity, protocol.ErrorOut(rid=msg.rid, message=self._none_alive()))
            return
        rid = f"dp{next(self._rids)}"
        self.pending[rid] = Pending(identity, msg.rid, replica)
        self.by_client[(identity, msg.rid)] = rid
        replica.load += 1
        replica.socket.send(protocol.encode(msgspec.structs.replace(msg, rid=rid)))

    def _abort(self, identity: bytes, client_rid: str) -> None:
        rid = self.by_client.get((identity, client_rid))
        if rid is not None:  # unknown: finished already, or never sent (the runtime ignores it too)
            self.pending[rid].replica.socket.send(protocol.encode(protocol.AbortReq(rid=rid)))

    def _scatter(self, identity: bytes, msg) -> None:
        live = [r for r in self.replicas if r.alive]
        if not live:
            self._send(identity, protocol.ErrorOut(rid=msg.rid, message=self._none_alive()))
            return
        gather = Gather(identity, msg, waiting={r.index for r in live})
        for r in live:
            rid = f"dp{next(self._rids)}"
            self.gather_parts[rid] = (gather, r.index)
            r.socket.send(protocol.encode(msgspec.structs.replace(msg, rid=rid)))

    def _client_gone(self, identity: bytes) -> None:
        rids = [rid for rid, p in self.pending.items() if p.client == identity]
        for rid in rids:
            self.pending[rid].replica.socket.send(protocol.encode(protocol.AbortReq(rid=rid)))
            self._finish(rid)
        for rid in [rid for rid, (g, _) in self.gather_parts.items() if g.client == identity]:
            del self.gather_parts[rid]
        if rids:
            logger.info("client went away: aborted %d request(s)", len(rids))

    # ---- replicas -> clients
    def _relay_replies(self, replica: Replica) -> None:
        while True:
            try:
                data = replica.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = protocol.decode_reply(data)
            except Exception as e:  # a runtime of another sglite version, say: never end the loop
                logger.error("%s sent an undecodable reply (%d bytes): %s", replica.name,
                             len(data), e)
                continue
            if reply.rid in self.pending:
                p = self.pending[reply.rid]
                if _is_last(reply):
                    self._finish(reply.rid)
                self._send(p.client, msgspec.structs.replace(reply, rid=p.rid))
            elif reply.rid in self.gather_parts:
                gather, index = self.gather_parts.pop(reply.rid)
                self._gathered(gather, index, reply)
            # else: a reply for a request whose client went away (its abort's last chunk)

    def _gathered(self, gather: Gather, index: int, reply) -> None:
        gather.replies[index] = reply
        gather.waiting.discard(index)
        if gather.waiting:
            return
        if isinstance(gather.msg, protocol.InfoReq):
            self._send(gather.client, self._merged_info(gather))
        else:
            self._send(gather.client, self._merged_flush(gather))

    def _merged_info(self, gather: Gather):
        infos = {i: rep.info for i, rep in gather.replies.items()
                 if isinstance(rep, protocol.InfoOut)}
        if not infos:
            errors = "; ".join(f"{self.replicas[i].name}: {_describe(rep)}"
                               for i, rep in gather.replies.items())
            return protocol.ErrorOut(rid=gather.msg.rid, message=f"no replica answered: {errors}")
        info = merge_infos([infos[i] for i in sorted(infos)])
        info["dp_size"] = len(self.replicas)
        info["pid"] = os.getpid()  # the process the client talks to; replicas' pids below
        info["replicas"] = [self._replica_info(r, infos.get(r.index), gather.replies)
                            for r in self.replicas]
        integrity = [f"{self.replicas[i].name}: {v['integrity']}"
                     for i, v in sorted(infos.items()) if v.get("integrity", "ok") != "ok"]
        if "integrity" in info:
            info["integrity"] = integrity[0] if integrity else "ok"
        return protocol.InfoOut(rid=gather.msg.rid, info=info)

    def _replica_info(self, r: Replica, info: dict | None, replies: dict) -> dict:
        own = {"index": r.index, "address": r.address, "alive": r.alive, "load": r.load,
               "num_routed": r.num_routed, "num_cache_routed": r.num_cache_routed,
               "tree_size": r.tree_size}
        if info is None:
            own["error"] = r.death or _describe(replies.get(r.index))
            return own
        return {**info, **own}

    def _merged_flush(self, gather: Gather):
        failed = []
        for i, rep in sorted(gather.replies.items()):
            if isinstance(rep, protocol.OkOut):
                self.replicas[i].text_tree.clear()
                self.replicas[i].ids_tree.clear()
            else:
                failed.append(f"{self.replicas[i].name}: {_describe(rep)}")
        if failed:
            return protocol.ErrorOut(rid=gather.msg.rid, message="; ".join(failed))
        return protocol.OkOut(rid=gather.msg.rid)

    def _finish(self, rid: str) -> None:
        p = self.pending.pop(rid)
        del self.by_client[(p.client, p.rid)]
        p.replica.load -= 1

    def _send(self, identity: bytes, msg) -> None:
        if self.peers.is_gone(identity):
            return
        try:
            self.front.send_multipart([identity, protocol.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            if self.peers.mark_gone(identity):
                self._client_gone(identity)

    # ---- liveness
    def _check_processes(self) -> None:
        now = time.monotonic()
        if now - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = now
        for r in self.replicas:
            if r.alive and r.process is not None and not r.process.is_alive():
                self._replica_died(r, f"its process exited with code {r.process.proc.returncode} "
                                   f"(log: {r.process.log_path})")
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            logger.info("the launching process is gone; shutting down")
            self.stopping = True

    def _replica_died(self, r: Replica, reason: str) -> None:
        r.alive = False
        if r.process is not None and not r.process.is_alive():
            reason = f"its process exited with code {r.process.proc.returncode} " \
                     f"(log: {r.process.log_path})"
        message = r.death = f"{r.name} died: {reason}"
        logger.error("%s; %d request(s) lost", message, r.load)
        for rid in [rid for rid, p in self.pending.items() if p.replica is r]:
            p = self.pending[rid]
            self._finish(rid)
            self._send(p.client, protocol.ErrorOut(rid=p.rid, message=message))
        for rid in [rid for rid, (_, i) in self.gather_parts.items() if i == r.index]:
            gather, _ = self.gather_parts.pop(rid)
            self._gathered(gather, r.index, protocol.ErrorOut(rid=rid, message=message))
        r.text_tree.clear()
        r.ids_tree.clear()
        # final, as for a client's connection: a dead replica's socket stops reconnecting
        self.poller.unregister(r.socket)
        self.poller.unregister(r.monitor)
        r.close()

    def _none_alive(self) -> str:
        return f"no live replica: all {len(self.replicas)} died"

    def _stop(self, *_):
        self.stopping = True


def routing_key(msg) -> str | tuple[int, ...]:
    """The prompt a request starts with: its text or its token ids."""
    if isinstance(msg, protocol.GenerateReq):
        return msg.text if msg.text is not None else tuple(msg.input_ids or ())
    return msg.text  # ScoreReq


def merge_infos(infos: list[dict]) -> dict:
    """One info for the whole group: model facts from the first, numbers summed, ratios redone."""
    merged = dict(infos[0])
    for key, value in infos[0].items():
        if key in _SAME_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        merged[key] = sum(i.get(key, 0) for i in infos
                          if isinstance(i.get(key), (int, float)))
    if merged.get("num_prompt_tokens"):
        hit_rate = merged["num_cached_tokens"] / merged["num_prompt_tokens"]
        merged["cache_hit_rate"] = round(hit_rate, 4)
    if merged.get("kv_total"):
        merged["kv_usage"] = round(
            1 - (merged["kv_free"] + merged["kv_evictable"]) / merged["kv_total"], 4)
    return merged


def _is_last(reply) -> bool:
    if isinstance(reply, protocol.GenerateOut):
        return reply.finished
    return True  # ScoreOut, ErrorOut


def _describe(reply) -> str:
    return reply.message if isinstance(reply, protocol.ErrorOut) else type(reply).__name__


def _guess_rid(data: bytes) -> str:
    try:
        obj = msgspec.msgpack.decode(data)
        return str(obj.get("rid", "")) if isinstance(obj, dict) else ""
    except Exception:
        return ""
