"""Free list of KV slots. Slot 0 is reserved as the padding target and never handed out."""

from __future__ import annotations

import torch


class TokenPool:
    """Hands out KV slots 1..total_size. Slots are int64 CPU tensors (the scheduler's currency).

    Freed slots go to a pending list and are merged into the free tensor only when an allocation
    needs them, so that many small frees cost one concatenation instead of one each.
    """

    def __init__(self, total_size: int):
        if total_size < 1:
            raise ValueError(f"TokenPool needs at least one usable slot, got {total_size}")
        self.total_size = total_size
        self._free = torch.arange(1, total_size + 1, dtype=torch.int64)
        self._pending: list[torch.Tensor] = []
        self._num_pending = 0
        # NOTE: is_allocated[s] guards against double free and freeing foreign slots.
        self._is_allocated = torch.zeros(total_size + 1, dtype=torch.bool)

    @property
    def available_size(self) -> int:
        return int(self._free.numel()) + self._num_pending

    def alloc(self, n: int) -> torch.Tensor | None:
        """n fresh slots, or None (nothing taken) if fewer than n are free."""
        if n > self.available_size:
            return None
        if n > self._free.numel():
            self._free = torch.cat([self._free, *self._pending])
            self._pending, self._num_pending = [], 0
        slots, self._free = self._free[:n], self._free[n:]
        self._is_allocated[slots] = True
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        slots = slots.to(device="cpu", dtype=torch.int64).flatten()
        assert int(slots.min()) > 0, "slot 0 is reserved and can never be freed"
        assert int(slots.max()) <= self.total_size, f"slot {int(slots.max())} is outside the pool"
        assert bool(self._is_allocated[slots].all()), "double free or freeing an unallocated slot"
        assert slots.unique().numel() == slots.numel(), "the same slot is freed twice in one call"
        self._is_allocated[slots] = False
        self._pending.append(slots.clone())
        self._num_pending += int(slots.numel())

    def reset(self) -> None:
        self.__init__(self.total_size)

    def check_integrity(self) -> None:
        """Free slots + allocated slots == total, with no slot in both and slot 0 in neither."""
        free = torch.cat([self._free, *self._pending])
        assert free.unique().numel() == free.numel(), "a slot is on the free list twice"
        assert not bool((free == 0).any()), "slot 0 is on the free list"
        assert not bool(self._is_allocated[free].any()), "a slot is both free and allocated"
        num_allocated = int(self._is_allocated.sum())
        assert free.numel() + num_allocated == self.total_size, "slots were lost"
