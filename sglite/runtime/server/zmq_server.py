"""The runtime process: a ZeroMQ ROUTER in front of the scheduler, in one thread.

Loop: receive every pending message (blocking briefly only when idle) → handle each (tokenize,
validate, queue) → one scheduler step. Replies go to the sender's identity. A message that cannot
be decoded or a request that fails gets an ErrorOut to its sender only; nothing a client sends can
stop the loop.

Liveness (issue 20): a client that goes away has all its requests aborted (their KV freed) at the
next receive, i.e. between two scheduler steps: the socket monitor reports its closed connection
(`peers.PeerTracker`; a SIGKILLed client is seen in a few ms), ZMTP heartbeats close the
connection of a peer that stops answering them (a frozen host), and with ROUTER_MANDATORY a send
to a vanished client fails. The heartbeats are answered by libzmq's own I/O thread, not by this
loop, so a client's ping is answered promptly even while a forward runs.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import msgspec
import zmq

from sglite import protocol
from sglite.runtime.server.args import ServerArgs, is_loopback
from sglite.runtime.server.handlers import RequestHandler
from sglite.runtime.server.peers import PeerTracker

logger = logging.getLogger("sglite.runtime")

IDLE_POLL_MS = 100  # wait for messages this long when there is nothing to compute
TOKENIZE_WAIT_S = 0.002  # ... or this long for a text on the tokenizer thread (messages keep coming)
# ZMTP heartbeats towards clients: a peer that answers none for HEARTBEAT_TIMEOUT_MS is dropped
# (a process that exits or is killed closes its connection at once and needs none of this)
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000
INTEGRITY_EVERY_S = 5.0  # check KV accounting this often while idle


class Server:
    def __init__(self, args: ServerArgs, scheduler, handler_factory=RequestHandler):
        self.args = args
        self.address = args.bind_address
        self.scheduler = scheduler
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> EHOSTUNREACH
        self.socket.setsockopt(zmq.SNDHWM, 0)  # never drop a reply part of a stream
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.peers = PeerTracker(self.socket)
        self.auth = _require_token(self.ctx, self.socket, args.auth_token)
        if not is_loopback(self.address):
            logger.warning("serving %s beyond this machine: clients need the auth token; the "
                           "traffic itself is not encrypted", self.address)
        self.socket.bind(self.address)
        self.handler = handler_factory(self)
        self.stopping = False
        self._gone_on_send: list[bytes] = []  # clients a send found gone (see send)
        self._last_check = 0.0
        self._parent_pid = int(os.environ.get("SGLITE_PARENT_PID", "0")) or None

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        logger.info("sglite runtime ready at %s", self.address)
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> None:
        """One iteration of the loop: messages, tokenized requests, then a scheduler step."""
        busy = self.scheduler.has_work
        self._receive(block=not busy and not self.handler.tokenizing)
        # with nothing to compute, wait a little for a tokenization instead of spinning
        self.handler.admit_tokenized(timeout=0.0 if busy else TOKENIZE_WAIT_S)
        if self.scheduler.has_work:
            self.scheduler.step()
            self.handler.after_step()
        else:
            self._idle()

    def send(self, identity: bytes, msg: msgspec.Struct) -> bool:
        """False when the client is gone; its requests are then aborted."""
        if self.peers.is_gone(identity):
            return False
        try:
            self.socket.send_multipart([identity, protocol.encode(msg)])
            return True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            if self.peers.mark_gone(identity):
                # its requests end at the next receive, not inside the step that is sending
                # (an abort there would release KV and edit the queues under the scheduler's loop)
                self._gone_on_send.append(identity)
            return False

    def close(self) -> None:
        self.handler.close()
        self.peers.close()
        self.socket.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except OSError:
                pass

    # ---- private
    def _receive(self, *, block: bool) -> None:
        if block:
            self.socket.poll(IDLE_POLL_MS)
        # the monitor is read after the messages (see peers.py for why the order matters)
        batch, gone = self.peers.receive()
        gone, self._gone_on_send = self._gone_on_send + gone, []
        for identity in gone:
            self.handler.client_gone(identity)
        for identity, frames in batch:
            if len(frames) != 2:  # a DEALER sends single-frame messages (plus our identity frame)
                self.send(identity, protocol.ErrorOut(rid="", message=(
                    f"expected one frame per message, got {len(frames) - 1}")))
                continue
            try:
                self.handler.handle(identity, frames[1].bytes)
            except Exception:  # the handler answers per request; this is the last guard
                logger.exception("handling a message failed; dropped it")

    def _idle(self) -> None:
        now = time.monotonic()
        if now - self._last_check < INTEGRITY_EVERY_S:
            return
        self._last_check = now
        self.scheduler.cache.check_integrity()
        self.scheduler.cache.token_pool.check_integrity()
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            logger.info("the launching process is gone; shutting down")
            self.stopping = True

    def _stop(self, *_):
        self.stopping = True


def _require_token(ctx: zmq.Context, socket: zmq.Socket, token: str | None):
    """With a token, only ZMTP PLAIN connections presenting it get through (checked by pyzmq's
    ZAP handler thread at the handshake, so a rejected peer never reaches the loop)."""
    if not token:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("sglite.runtime.auth"))
    auth.start()
    auth.configure_plain(domain="*", passwords={protocol.AUTH_USERNAME: token})
    socket.plain_server = True
    return auth


def serve(args: ServerArgs) -> None:
    """Load the model and serve until SIGTERM/SIGINT (or the launching process exits).
    SGLITE_PROFILE=path: run the loop under cProfile and write its top functions there, and the raw
    table to path.prof ("{pid}" in the path becomes the process id: several runtimes of one
    benchmark keep their own tables)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from sglite.runtime.executor.model_runner import ModelRunner
    from sglite.runtime.scheduler.scheduler import Scheduler

    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    runner = ModelRunner(
        args.model_path, dtype=args.dtype, device=args.device,
        attention_backend=args.attention_backend, load_format=args.load_format,
        preset=args.preset, max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests, max_context_len=args.context_length,
        page_size=args.page_size, seed=args.seed, disable_cuda_graph=args.disable_cuda_graph,
        cuda_graph_max_bs=args.cuda_graph_max_bs, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, tp_size=args.tp_size)
    grammar_cache = None
    if runner.tokenizer is not None:
        from sglite.runtime.sampling.constrained import GrammarCache
        from sglite.runtime.sampling.constrained.state import fill_threads

        fill_threads()  # a bad SGLITE_GRAMMAR_FILL_THREADS fails the start, not a constrained batch
        grammar_cache = GrammarCache(runner.tokenizer, runner.model_config.vocab_size,
                                     num_threads=args.grammar_threads,
                                     stop_token_ids=runner.model_config.eos_token_ids or None)
    scheduler = Scheduler(
        runner, chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=args.max_running_requests,
        disable_radix_cache=args.disable_radix_cache, schedule_policy=args.schedule_policy,
        grammar_cache=grammar_cache, enable_jump_forward=not args.disable_jump_forward,
        disable_window_free=args.disable_window_free, log_interval=args.log_interval,
        # on the CPU a forward runs as it is launched, so a decode launched ahead only delays the
        # tokens read after it (and is wasted when EOS ends the request)
        enable_overlap=not args.disable_overlap and runner.device.type == "cuda")
    _freeze_startup_objects(scheduler)
    profile_path = os.environ.get("SGLITE_PROFILE")  # where the loop's cProfile table goes
    if not profile_path:
        Server(args, scheduler).run()
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    try:
        prof.runcall(Server(args, scheduler).run)
    finally:
        path = profile_path.replace("{pid}", str(os.getpid()))
        prof.dump_stats(path + ".prof")  # the raw table, for pstats' callers / callees views
        with open(path, "w") as f:
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=f).sort_stats(key).print_stats(40)


def _freeze_startup_objects(scheduler) -> None:
    """Move what start-up allocated (the model's modules and tensors, the tokenizer, the grammar
    compiler, imported modules) out of the garbage collector's view, as SGLang does after its
    warm-up: each full collection would walk all of it again, a stall of the whole batch. GC
    pauses are charged to the host phase "gc<generation>" from here on (InfoReq's host_time_s)."""
    import gc

    gc.collect()
    gc.freeze()
    scheduler.stats.watch_gc()
