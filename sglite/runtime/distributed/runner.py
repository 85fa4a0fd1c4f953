"""Tensor parallelism of a ModelRunner: one process per rank, every rank running the same forwards.

`ModelRunner(tp_size=N)` (rank 0, the process the scheduler runs in) calls `start_tensor_parallel`
once its full model is loaded: it spawns ranks 1..N-1, each building the same runner with
tp_rank=r, and every rank shards its model in place (layers.shard_model) and sizes its KV pool for
its own heads (runner.model_config becomes the rank's view: its heads; the vocabulary stays whole).

Rank 0 decides, the others follow: the runner methods the scheduler calls (make_extend_batch,
make_decode_batch, forward_decode, forward) and the cache manager's req_to_token writes broadcast
their arguments before running (MIRRORED), and ranks > 0 sit in `serve_worker`, running the same
call on their shard. Scheduling state (slots, rows, the
radix tree) lives on rank 0 only; a worker's req_to_token and KV pool are written by the same calls
in the same order, so they hold the same slots. Tensors go as tensors (host ones over the gloo
group, device ones, e.g. the overlapped decode's fed ids, over the device group); a ForwardBatch
that a mirrored make_* call returned is sent by reference to the worker's own copy of it.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import threading
import time
import weakref

import msgspec
import numpy as np
import torch

from sglite.runtime.distributed.group import TPGroup, make_store
from sglite.runtime.distributed.layers import shard_config, shard_model

logger = logging.getLogger(__name__)

# what rank 0 runs that changes or reads a rank's device state, by attribute path on the runner:
# the batch builders and forwards, and the cache manager's own req_to_token writes (prefix hits,
# a shared prefix's tree slots replacing a request's duplicates, window-freed positions)
MIRRORED = ("make_extend_batch", "make_decode_batch", "forward_decode", "forward", "req_to_token.write")
_KEEP_BATCHES = 16  # batches a worker remembers for later forward(batch) calls
_worker_port: int | None = None  # set in a worker process before its runner is built


@dataclasses.dataclass(frozen=True)
class _TensorArg:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_device: bool


@dataclasses.dataclass(frozen=True)
class _BatchRef:
    seq: int


class TensorParallel:
    """A runner's place in its group; rank 0's also owns the worker processes."""

    def __init__(self, group: TPGroup, procs: list | None = None):
        self.group, self.procs = group, procs or []
        self._closed = False

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world(self) -> int:
        return self.group.world

    def agree_kv_tokens(self, config, kv_dtype, max_total_tokens: int | None,
                        kv_memory_bytes: int | None) -> int:
        """The KV pool size in tokens that every rank holds: the smallest rank's (ranks' heads,
        and on CUDA their free memory, may differ; rank 0's slots must exist on every rank)."""
        from sglite.runtime.mem.kv_cache import bytes_per_token

        if max_total_tokens is None:
            max_total_tokens = kv_memory_bytes // bytes_per_token(config, kv_dtype) - 1
        return self.group.min_int(max_total_tokens)

    def close(self) -> None:
        """Rank 0: tell the workers to stop and reap them."""
        if self._closed or self.rank != 0:
            return
        self._closed = True
        try:
            self.group.broadcast_bytes(_pack(None))
        except Exception:  # a worker already gone: nothing to stop
            pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def start_tensor_parallel(runner, init_args: dict) -> TensorParallel:
    """Called by ModelRunner.__init__ right after the full model is loaded (before the KV pool)."""
    rank, world = init_args["tp_rank"], init_args["tp_size"]
    shard_config(runner.model_config, rank, world)  # a head count that does not split: raise now
    if rank == 0:
        if runner.device.type == "cpu":  # the ranks share the cores: OpenMP pools must not overlap
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        store = make_store(0, world)
        procs = _spawn_workers(init_args, runner.device, store.port)
        _wait_for_workers(store, procs)
    else:
        if _worker_port is None:
            raise RuntimeError("ranks > 0 are started by rank 0's ModelRunner(tp_size=N), not directly")
        store, procs = make_store(rank, world, _worker_port), []
        store.set(f"ready{rank}", "1")
    if runner.device.type == "cuda":
        torch.cuda.set_device(runner.device)
    tp = TensorParallel(TPGroup(store, rank, world, runner.device), procs)
    shard_model(runner.model, tp.group)
    runner.model_config = shard_config(runner.model_config, rank, world)
    if rank == 0:
        _Leader(runner, tp.group).install()
        weakref.finalize(runner, tp.close)
        atexit.register(tp.close)
    logger.info("tensor parallel rank %d/%d: %d heads, %d KV heads", rank, world,
                runner.model_config.num_heads, runner.model_config.num_kv_heads)
    return tp


def _spawn_workers(init_args: dict, device: torch.device, port: int) -> list:
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, init_args["tp_size"]):
        args = dict(init_args, tp_rank=rank, skip_tokenizer_init=True)
        if device.type == "cuda":
            args["device"] = f"cuda:{(device.index or 0) + rank}"
        else:
            args["device"] = str(device)
        p = ctx.Process(target=_worker_main, args=(args, port, os.getpid(), torch.get_num_threads()),
                        daemon=True, name=f"sglite-tp{rank}")
        p.start()
        procs.append(p)
    return procs


def _wait_for_workers(store, procs: list) -> None:
    """Until every worker has built its model and joined the store; a worker that dies first
    (a bad checkpoint, no memory) raises here instead of leaving rank 0 in the group's set-up."""
    for rank, p in enumerate(procs, start=1):
        while not store.check([f"ready{rank}"]):
            if not p.is_alive():
                for q in procs:
                    q.terminate()
                raise RuntimeError(f"tensor parallel rank {rank} exited with code {p.exitcode} "
                                   "before joining (its log is above)")
            time.sleep(0.05)


def _worker_main(init_args: dict, port: int, parent_pid: int, num_threads: int) -> None:
    global _worker_port
    _watch_parent(parent_pid)
    torch.set_num_threads(num_threads)  # as many as rank 0 runs with (CPU: its share of the cores)
    _worker_port = port
    from sglite.runtime.executor.model_runner import ModelRunner

    runner = ModelRunner(**init_args)
    serve_worker(runner)


def _watch_parent(parent_pid: int) -> None:
    """A worker outlives no killed rank 0 (its next broadcast would wait for the timeout)."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="tp-parent-watch").start()


def serve_worker(runner) -> None:
    """Ranks > 0: run each call rank 0 broadcasts until it says stop (None)."""
    group, batches = runner.tp.group, {}
    while True:
        msg = _unpack(group.broadcast_bytes())
        if msg is None:
            return
        name, args, kwargs, seq, metas = msg
        tensors = [_recv_tensor(group, m, runner.device) for m in metas]
        args, kwargs = _decode(args, tensors, batches), _decode(kwargs, tensors, batches)
        try:
            out = _target(runner, name)(*args, **kwargs)
        except Exception:  # rank 0 raised the same (same checks, same inputs): keep following
            logger.exception("tp rank %d: %s failed", group.rank, name)
            continue
        if seq is not None:
            batches[seq] = out
            batches.pop(seq - _KEEP_BATCHES, None)


class _Leader:
    """Rank 0: wraps the runner's mirrored methods so each outermost call is broadcast first."""

    def __init__(self, runner, group: TPGroup):
        self.runner, self.group = runner, group
        self.depth, self.seq = 0, 0
        self.batches: dict[int, tuple[int, object]] = {}  # id(batch) -> (seq, batch)

    def install(self) -> None:
        """The runner's own methods now; req_to_token's write once the first mirrored call runs:
        the hook runs before the runner has made req_to_token, and nothing writes it before a
        forward (a prefix hit needs a tree that a forward filled)."""
        self.late = [name for name in MIRRORED if "." in name]
        for name in MIRRORED:
            if name not in self.late:
                self._install(name)

    def _install(self, name: str) -> None:
        owner, _, attr = name.rpartition(".")
        owner = _target(self.runner, owner) if owner else self.runner
        setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name: str, fn):
        def call(*args, **kwargs):
            if self.depth:  # inside a mirrored call: the workers make the same nested call
                return fn(*args, **kwargs)
            while self.late:
                self._install(self.late.pop())
            seq = None
            if name.startswith("make_"):
                seq, self.seq = self.seq, self.seq + 1
            tensors: list[torch.Tensor] = []
            enc_args, enc_kwargs = self._encode(args, tensors), self._encode(kwargs, tensors)
            metas = [_TensorArg(i, tuple(t.shape), t.dtype, t.device.type != "cpu")
                     for i, t in enumerate(tensors)]
            self.group.broadcast_bytes(_pack((name, enc_args, enc_kwargs, seq, metas)))
            for t in tensors:
                self.group.broadcast(t.contiguous())
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if seq is not None:
                self.batches[id(out)] = (seq, out)
                for key in [k for k, (s, _) in self.batches.items() if s <= seq - _KEEP_BATCHES]:
                    del self.batches[key]
            return out

        return call

    def _encode(self, obj, tensors: list):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
            return _TensorArg(len(tensors) - 1, (), obj.dtype, False)  # placeholder, see metas
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._encode(o, tensors) for o in obj)
        if isinstance(obj, dict):
            return {k: self._encode(v, tensors) for k, v in obj.items()}
        if type(obj).__name__ == "ForwardBatch":
            known = self.batches.get(id(obj))
            if known is None or known[1] is not obj:
                raise NotImplementedError("tensor parallel: forward() of a batch that no mirrored "
                                          "make_*_batch call built")
            return _BatchRef(known[0])
        return obj


# The control message on the wire: msgpack, with ext types for what plain msgpack lacks (tuples,
# tensor placeholders, batch references); anything else is refused when it is encoded.
_EXT_TUPLE, _EXT_TENSOR, _EXT_BATCH = 1, 2, 3


def _to_wire(obj):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list):
        return [_to_wire(o) for o in obj]
    if isinstance(obj, tuple):
        return msgspec.msgpack.Ext(_EXT_TUPLE, msgspec.msgpack.encode([_to_wire(o) for o in obj]))
    if isinstance(obj, dict):
        return {str(k): _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, _TensorArg):
        return msgspec.msgpack.Ext(_EXT_TENSOR, msgspec.msgpack.encode(
            [obj.index, list(obj.shape), str(obj.dtype).removeprefix("torch."), obj.on_device]))
    if isinstance(obj, _BatchRef):
        return msgspec.msgpack.Ext(_EXT_BATCH, msgspec.msgpack.encode(obj.seq))
    raise TypeError(f"tensor parallel: cannot send a {type(obj).__name__} to the other ranks")


def _from_ext(code: int, data: memoryview):
    value = msgspec.msgpack.decode(data, ext_hook=_from_ext)
    if code == _EXT_TUPLE:
        return tuple(value)
    if code == _EXT_TENSOR:
        index, shape, dtype, on_device = value
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"tensor parallel: unknown dtype {dtype!r} in a control message")
        return _TensorArg(index, tuple(shape), dt, on_device)
    if code == _EXT_BATCH:
        return _BatchRef(value)
    raise ValueError(f"tensor parallel: unknown ext type {code} in a control message")


def _pack(msg) -> bytes:
    return msgspec.msgpack.encode(_to_wire(msg))


def _unpack(data: bytes):
    return msgspec.msgpack.decode(data, ext_hook=_from_ext)


def _target(runner, path: str):
    for part in path.split("."):
        runner = getattr(runner, part)
    return runner


def _recv_tensor(group: TPGroup, meta: _TensorArg, device: torch.device) -> torch.Tensor:
    t = torch.empty(meta.shape, dtype=meta.dtype, device=device if meta.on_device else "cpu")
    return group.broadcast(t)


def _decode(obj, tensors: list, batches: dict):
    if isinstance(obj, _TensorArg):
        return tensors[obj.index]
    if isinstance(obj, _BatchRef):
        return batches[obj.seq]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(o, tensors, batches) for o in obj)
    if isinstance(obj, dict):
        return {k: _decode(v, tensors, batches) for k, v in obj.items()}
    return obj
