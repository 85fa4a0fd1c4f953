"""One tensor-parallel group: its ranks' collectives on the model's device (gloo on the CPU, NCCL
on CUDA) and a gloo side group for the host-side control messages of the worker loop.

The groups are process-group objects of their own, made from a TCPStore, not torch.distributed's
global default group: a process may hold several (tests build TP runners one after another) and
nothing of the rest of the program sees them.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)  # of a model collective (and of the set-up)
IDLE_TIMEOUT = datetime.timedelta(days=365)  # of the control broadcasts (see TPGroup.__init__)


def make_store(rank: int, world: int, port: int = 0) -> dist.TCPStore:
    """Rank 0 hosts the store (port 0: a free one, read back as store.port); the others join it."""
    # the host does not wait for the others here: it starts them after it knows its port
    return dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=TIMEOUT, wait_for_workers=False)


class TPGroup:
    def __init__(self, store: dist.TCPStore, rank: int, world: int, device: torch.device):
        if not 0 <= rank < world:
            raise ValueError(f"tp rank {rank} outside a group of {world}")
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.store = store
        # control: a worker waits here for rank 0's next call however long the server idles
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank, world, IDLE_TIMEOUT)
        if self.device.type == "cuda":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on these hosts
            self.dev = dist.ProcessGroupNCCL(dist.PrefixStore("dev", store), rank, world)
            # NCCL makes its communicator on the first collective: here, not inside a CUDA
            # graph capture (the decode graphs hold the layers' all-reduces)
            self.all_reduce(torch.zeros(1, device=self.device))
            torch.cuda.synchronize(self.device)
        else:
            self.dev = dist.ProcessGroupGloo(dist.PrefixStore("dev", store), rank, world, TIMEOUT)

    # --- model collectives (on the device group) ------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (x contiguous); returns x."""
        self.dev.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., world * n], rank r's block at r * n."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dev.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    # --- control (host) ---------------------------------------------------------------------------
    def broadcast(self, t: torch.Tensor, *, src: int = 0) -> torch.Tensor:
        """In place from src: host tensors over the control group, CUDA ones over NCCL."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        (self.dev if t.device.type == "cuda" else self.cpu).broadcast([t], opts).wait()
        return t

    def broadcast_bytes(self, payload: bytes = b"", *, src: int = 0) -> bytes:
        """Bytes from src to every rank (two host broadcasts: length, bytes). The caller encodes
        them (runner.py: msgpack, never pickle: a rank that unpickles runs whatever arrives)."""
        if self.rank == src:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.broadcast(size, src=src)
        if self.rank != src:
            data = torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            self.broadcast(data, src=src)
        return payload if self.rank == src else data.numpy().tobytes()

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV slots that fit on each rank's device)."""
        t = torch.tensor([-int(value)], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.cpu.allreduce([t], opts).wait()
        return -int(t)
