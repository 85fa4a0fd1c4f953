"""Request slot -> KV slot of each position: the table every attention backend reads."""

from __future__ import annotations

import torch


class ReqToToken:
    """`table[req_pool_idx, pos]` is the KV slot of position `pos` of the request in that row."""

    def __init__(self, max_reqs: int, max_context_len: int, *, device: str | torch.device = "cpu"):
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        # zeros: unwritten positions point at the padding slot 0, which is always valid memory
        self.table = torch.zeros(max_reqs, max_context_len, dtype=torch.int32, device=device)
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
        """Positions [start, start + len(slots)) of row idx now live in `slots`."""
        end = start + int(slots.numel())
        if end > self.max_context_len:
            raise ValueError(f"position {end - 1} exceeds max_context_len={self.max_context_len}")
        self.table[idx, start:end] = slots.to(device=self.table.device, dtype=torch.int32)

    def read(self, idx: int, start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of row idx, int64 on CPU."""
        return self.table[idx, start:end].to(device="cpu", dtype=torch.int64)
