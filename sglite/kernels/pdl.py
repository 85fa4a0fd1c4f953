"""Programmatic dependent launch (PDL, Hopper and later) for the small kernels between matmuls.

At batch 1 a decode step is ~350 launches, most of them a few microseconds long, and each waits
for its predecessor to finish before the GPU even starts launching it. A kernel launched with
PDL may be launched while its predecessor still runs; its programs then block in
`wait_for_previous()` (PTX griddepcontrol.wait: the predecessor has completed and its writes are
visible) before touching anything the predecessor wrote. Every kernel here calls it first, and
none signals its dependents early, so each kernel still starts its real work only after the one
before it has finished: the order and the results are those of plain launches. Captured into
CUDA graphs, the launches become programmatic edges.

`SGLITE_PDL=0` turns it off (read at import; the before/after benchmark).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # an older triton: no PDL
    _gdc_wait = None

ENABLED = os.environ.get("SGLITE_PDL", "1") != "0" and _gdc_wait is not None


def use_pdl(t: torch.Tensor) -> bool:
    """Whether launches computing on t's device use PDL (a CUDA device of compute capability 9+)."""
    return ENABLED and t.is_cuda and _capability_major(t.device.index) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """First statement of every kernel here: with PDL, wait until the previous kernel has completed."""
    if USE_PDL:
        _gdc_wait()


def pdl_options(t: torch.Tensor) -> dict:
    """Launch options for a kernel that calls wait_for_previous, computing on t's device: its
    USE_PDL constexpr and triton's launch_pdl (none on a CPU or a pre-Hopper GPU)."""
    return dict(USE_PDL=True, launch_pdl=True) if use_pdl(t) else {}
