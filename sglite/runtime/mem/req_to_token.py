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
    device) are recorded into the mirror with `mirror`. The scheduler's writes reach the device
    table in one copy per forward (`flush`, which the model runner calls before it launches one):
    a copy per write was ~85 us of host time each, and a 200-program select makes 2000 of them."""

    def __init__(self, max_reqs: int, max_context_len: int, *, device: str | torch.device = "cpu"):
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        # zeros: unwritten positions point at the padding slot 0, which is always valid memory
        self.table = torch.zeros(max_reqs, max_context_len, dtype=torch.int32, device=device)
        self.host = self.table if self.table.device.type == "cpu" else torch.zeros_like(self.table, device="cpu")
        self._dirty: dict[int, list[int]] = {}  # row -> [lo, hi) written on the host only
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
        if self.host is not self.table:  # the device's copy waits for the next flush
            span = self._dirty.get(idx)
            if span is None:
                self._dirty[idx] = [start, end]
            else:
                span[0], span[1] = min(span[0], start), max(span[1], end)

    def flush(self) -> None:
        """Copy what `write` put into the mirror since the last flush to the device table: each
        written row's span [lo, hi), their values gathered into one pinned block, one
        host-to-device copy (it waits for no forward) and one scatter whose indices are built on
        the device. Every forward that reads the table is launched after it (ModelRunner)."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        rows, spans = list(dirty), list(dirty.values())
        lengths = [hi - lo for lo, hi in spans]
        total = sum(lengths)
        values = torch.empty(total, dtype=torch.int32, pin_memory=True)
        torch.cat([self.host[r, lo:hi] for r, (lo, hi) in zip(rows, spans)], out=values)
        meta = torch.tensor([rows, [lo for lo, _ in spans], lengths], dtype=torch.int64).pin_memory()
        device = self.table.device
        row, lo, length = meta.to(device, non_blocking=True)
        values = values.to(device, non_blocking=True)
        # element j of row i's run lies at lo[i] + j - first[i] (output_size: no sync for the shape)
        first = torch.cumsum(length, 0) - length
        rows_of = torch.repeat_interleave(row, length, output_size=total)
        shift = torch.repeat_interleave(first - lo, length, output_size=total)
        self.table[rows_of, torch.arange(total, device=device) - shift] = values

    def mirror(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Record in the host mirror what a forward wrote into the device table:
        table[rows[i], positions[i]] = slots[i] (CPU tensors)."""
        if self.host is not self.table:
            self.host[rows.long(), positions.long()] = slots.to(torch.int32)

    def check_mirror(self, idx: int, end: int) -> None:
        """The device row agrees with the host mirror on positions [0, end) (integrity checks:
        this read waits for the GPU)."""
        if self.host is not self.table:
            self.flush()
            device_row = self.table[idx, :end].cpu()
            bad = (device_row != self.host[idx, :end]).nonzero().flatten()
            assert not len(bad), (f"req_to_token row {idx}: the host mirror differs from the device "
                                  f"at positions {bad[:8].tolist()}")

    def read(self, idx: int, start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of row idx, int64 on CPU (never waits for the GPU)."""
        return self.host[idx, start:end].to(torch.int64)
