"""Free list of KV slots. Slot 0 is reserved as the padding target and never handed out."""

from __future__ import annotations

import numpy as np
import torch


class TokenPool:
    """Hands out KV slots 1..total_size. Slots are int64 CPU tensors (the scheduler's currency).

    Freed slots go to a pending list and are merged into the free tensor only when an allocation
    needs them, so that many small frees cost one concatenation instead of one each.
    """

    page_size = 1  # hands out single slots only (PagedTokenPool: whole pages too)

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


SMALL_FREE = 8  # PagedTokenPool.free of at most this many slots takes the plain-Python path


class PagedTokenPool(TokenPool):
    """A TokenPool that also hands out whole pages: runs of `page_size` consecutive slots starting
    at a multiple of page_size, so that a request's keys lie in long consecutive runs and decode
    attention reads a tile of them with one bulk copy (sglite/kernels/decode_attention.py).

    Slots stay the unit of ownership (the radix tree, window freeing and jump-forward free single
    slots); a page is "whole" while all its slots are free, and `alloc_pages` takes only whole
    pages. `alloc(n)` (any n free slots) takes from broken pages first and breaks whole pages
    only when those run out, so that pages stay whole for as long as the pool allows. Page 0 holds
    the padding slot and is never whole; slots after the last full page are loose too.
    """

    def __init__(self, total_size: int, page_size: int):
        if page_size < 2:
            raise ValueError(f"PagedTokenPool needs page_size >= 2, got {page_size}")
        if total_size < 1:
            raise ValueError(f"TokenPool needs at least one usable slot, got {total_size}")
        self.total_size = total_size
        self.page_size = page_size
        self.num_pages = (total_size + 1) // page_size  # pages wholly inside slots 0..total_size
        self._is_free = np.ones(total_size + 1, dtype=bool)
        self._is_free[0] = False
        self._num_free = total_size
        self._page_free = np.full(self.num_pages, page_size, dtype=np.int32)
        if self.num_pages:
            self._page_free[0] -= 1  # the padding slot
        self._whole: list[int] = list(range(self.num_pages - 1, 0, -1))  # a stack; entries may be stale
        self._cursor = 0  # where the next scan for loose slots starts

    @property
    def available_size(self) -> int:
        return self._num_free

    def num_whole_pages(self) -> int:
        return int((self._page_free[1:] == self.page_size).sum())

    def alloc_pages(self, k: int) -> np.ndarray | None:
        """k whole pages (their ids; page p holds slots [p * page_size, (p + 1) * page_size)), all
        their slots now allocated; or None (nothing taken) if fewer than k are whole."""
        pages: list[int] = []
        while len(pages) < k and self._whole:
            p = self._whole.pop()
            if self._page_free[p] == self.page_size and p not in pages:
                pages.append(p)
        if len(pages) < k:
            self._whole.extend(reversed(pages))
            return None
        ids = np.asarray(pages, dtype=np.int64)
        slots = (ids[:, None] * self.page_size + np.arange(self.page_size)).ravel()
        self._take(slots)
        return ids

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots anywhere, from broken pages first; None (nothing taken) if fewer are free."""
        if n > self._num_free:
            return None
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        found = self._scan(n, skip_whole=True)
        if len(found) < n:  # break whole pages for the rest
            rest = self._scan(n - len(found), skip_whole=False, exclude=found)
            found = np.concatenate([found, rest])
        self._take(found)
        return torch.from_numpy(found)

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        if slots.numel() <= SMALL_FREE:
            return self._free_few(slots.flatten().tolist())
        # sorted (a copy): the checks and the per-page counts need no np.unique (a select frees
        # ~3000 small runs, each a page's head or tail, where the numpy calls were the cost)
        s = np.sort(slots.to(device="cpu", dtype=torch.int64).flatten().numpy())
        assert s[0] > 0, "slot 0 is reserved and can never be freed"
        assert s[-1] <= self.total_size, f"slot {int(s[-1])} is outside the pool"
        assert not (s[1:] == s[:-1]).any(), "the same slot is freed twice in one call"
        assert not self._is_free[s].any(), "double free or freeing an unallocated slot"
        self._is_free[s] = True
        self._num_free += len(s)
        for page in self._count_pages(s, 1):
            if self._page_free[page] == self.page_size:
                self._whole.append(page)
        self._compact_whole()

    def _compact_whole(self) -> None:
        if len(self._whole) > 2 * self.num_pages:  # drop stale entries now and then
            self._whole = np.flatnonzero(self._page_free == self.page_size)[::-1].tolist()

    def _free_few(self, s: list[int]) -> None:
        """free() of a few slots in plain Python: the duplicates a select request frees (two
        slots) cost ~10 numpy calls of fixed overhead each on the vector path."""
        assert min(s) > 0, "slot 0 is reserved and can never be freed"
        assert max(s) <= self.total_size, f"slot {max(s)} is outside the pool"
        assert len(set(s)) == len(s), "the same slot is freed twice in one call"
        is_free, page_free, size = self._is_free, self._page_free, self.page_size
        assert not any(is_free[x] for x in s), "double free or freeing an unallocated slot"
        limit = self.num_pages * size
        for x in s:
            is_free[x] = True
            if x < limit:
                page_free[x // size] += 1
                if page_free[x // size] == size:
                    self._whole.append(x // size)
        self._num_free += len(s)
        self._compact_whole()

    def reset(self) -> None:
        self.__init__(self.total_size, self.page_size)

    def check_integrity(self) -> None:
        assert not self._is_free[0], "slot 0 is on the free list"
        assert int(self._is_free.sum()) == self._num_free, "free count out of date"
        per_page = self._is_free[: self.num_pages * self.page_size].reshape(-1, self.page_size).sum(1)
        assert (per_page == self._page_free).all(), "per-page free counts out of date"
        whole = set(np.flatnonzero(self._page_free == self.page_size).tolist())
        assert whole <= set(self._whole), "a whole page is missing from the stack"

    # ---- private
    def _take(self, slots: np.ndarray) -> None:
        assert self._is_free[slots].all(), "allocating a slot that is not free"
        self._is_free[slots] = False
        self._num_free -= len(slots)
        self._count_pages(np.sort(slots), -1)

    def _count_pages(self, s: np.ndarray, sign: int) -> list[int]:
        """Add sign * (how many of the sorted slots s lie on it) to each page's free count;
        returns the pages touched."""
        limit = self.num_pages * self.page_size
        if len(s) and s[-1] >= limit:  # loose slots past the last full page
            s = s[s < limit]
        if not len(s):
            return []
        size = self.page_size
        first, last = int(s[0]) // size, int(s[-1]) // size
        if first == last:  # the usual case: one page's head or tail
            self._page_free[first] += sign * len(s)
            return [first]
        pages = s // size
        starts = np.flatnonzero(np.concatenate(([True], pages[1:] != pages[:-1])))
        counts = np.diff(np.append(starts, len(pages))).astype(np.int32)
        ids = pages[starts]
        self._page_free[ids] += sign * counts
        return ids.tolist()

    def _scan(self, n: int, *, skip_whole: bool, exclude: np.ndarray | None = None) -> np.ndarray:
        """Up to n free slots, scanning the pool in chunks from the cursor round to it."""
        size, chunk, found, num = self.total_size + 1, 1 << 16, [], 0
        for a, b in ((self._cursor, size), (0, self._cursor)):
            for lo in range(a, b, chunk):
                hi = min(lo + chunk, b)
                idx = np.flatnonzero(self._is_free[lo:hi]) + lo
                if skip_whole and self.num_pages:
                    inside = idx < self.num_pages * self.page_size
                    page = np.minimum(idx // self.page_size, self.num_pages - 1)
                    idx = idx[~inside | (self._page_free[page] < self.page_size)]
                if exclude is not None and len(exclude):
                    idx = idx[~np.isin(idx, exclude)]
                found.append(idx[: n - num])
                num += len(found[-1])
                if num >= n:
                    self._cursor = int(found[-1][-1]) + 1 if len(found[-1]) else hi
                    return np.concatenate(found)
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
