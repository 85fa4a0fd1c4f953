"""Request slot -> KV slot of each position: the table every attention backend reads."""

from __future__ import annotations

import torch


class ReqToToken:
    """`table[req_pool_idx, pos]` is the KV slot of position `pos` of the request in that row.

    On a GPU `host` mirrors the table in CPU memory: the scheduler's reads (radix inserts, frees)
    come from the mirror, so none waits for the forward in flight (a read of the device table is
    a device-to-host copy behind every queued kernel: a finished request's release stalled the
    overlapped decode, and a select's cache phase waited for its extend). Every write goes to
    both; the model runner's own writes (the slots of a forward's new tokens, written on the
    device) are recorded into the mirror with `mirror`."""

    def __init__(self, max_reqs: int, max_context_len: int, *, device: str | torch.device = "cpu"):
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        # zeros: unwritten positions point at the padding slot 0, which is always valid memory
        self.table = torch.zeros(max_reqs, max_context_len, dtype=torch.int32, device=device)
        self.host = self.table if self.table.device.type == "cpu" else torch.zeros_like(self.table, device="cpu")
        self._free_rows = list(range(max_reqs))
        self._is_used = [False] * max_reqs

    @property
    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        if not self._free_rows:
            return None
        idx = self._free_rows.pop()
        self._is_used[idx] = True
        return idx

    def free(self, idx: int) -> None:
        assert self._is_used[idx], f"request row {idx} is not allocated"
        self._is_used[idx] = False
        self._free_rows.append(idx)

    def write(self, idx: int, start: int, slots: torch.Tensor) -> None:
        """Positions [start, start + len(slots)) of row idx now live in `slots` (on the CPU)."""
        end = start + int(slots.numel())
        if end > self.max_context_len:
            raise ValueError(f"position {end - 1} exceeds max_context_len={self.max_context_len}")
        self.host[idx, start:end] = slots
        if self.host is not self.table:  # from pinned memory: the copy does not wait for the GPU
            staged = self.host[idx, start:end].pin_memory()
            self.table[idx, start:end].copy_(staged, non_blocking=True)

    def mirror(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Record in the host mirror what a forward wrote into the device table:
        table[rows[i], positions[i]] = slots[i] (CPU tensors)."""
        if self.host is not self.table:
            self.host[rows.long(), positions.long()] = slots.to(torch.int32)

    def check_mirror(self, idx: int, end: int) -> None:
        """The device row agrees with the host mirror on positions [0, end) (integrity checks:
        this read waits for the GPU)."""
        if self.host is not self.table:
            device_row = self.table[idx, :end].cpu()
            bad = (device_row != self.host[idx, :end]).nonzero().flatten()
            assert not len(bad), (f"req_to_token row {idx}: the host mirror differs from the device "
                                  f"at positions {bad[:8].tolist()}")

    def read(self, idx: int, start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of row idx, int64 on CPU (never waits for the GPU)."""
        return self.host[idx, start:end].to(torch.int64)
