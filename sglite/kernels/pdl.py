"""Programmatic dependent launch (PDL, Hopper and later) for the small kernels between matmuls.

At batch 1 a decode step is ~350 launches, most of them a few microseconds long, and each waits
for its predecessor to finish before the GPU even starts launching it. A kernel launched with
PDL may be launched while its predecessor still runs; its programs then block in
`wait_for_previous()` (PTX griddepcontrol.wait: the predecessor has completed and its writes are
visible) before touching anything the predecessor wrote. Every kernel here calls it before it
reads any tensor a kernel of the same forward computed.

Early launch: a kernel's dependents launch only once all its programs have exited or called
`allow_dependents()`. The rotary kernel calls it right after its own wait, so decode attention
(which follows it) is launched while rotary runs and reads its batch metadata (lengths, request
rows) before waiting; decode attention does the same for the o projection after it (a PDL
launch there, the one-row GEMV, loads its first weights meanwhile; cuBLAS is not one). The rule that keeps this safe: code before `wait_for_previous()` reads
only what was written before the forward's matmuls began (the batch's inputs, req_to_token, the
KV pool's rows of earlier forwards: decode attention gathers its first tile there and reads the
new token's row again after the wait) or weights; a matmul is either a plain launch (cuBLAS, fp8_gemm's tiles), which starts only after
everything before it has completed, or a one-row GEMV (gemv.py, gemv_pairs.py, fp8_gemv.py) that
reads only its weights before its own wait.
Captured into CUDA graphs, the launches become programmatic edges.

`SGLITE_PDL=0` turns PDL off, `SGLITE_PDL_EARLY=0` only the early launch (read at import; the
before/after benchmarks).

Chained early launch: the norm, activation and one-row GEMV kernels also call
`allow_dependents()` right after their wait when their caller asks (`early=True`; the models
whose batch-1 projections run sglite.kernels.gemv instead of cuBLAS: Gemma), so that every kernel
of a layer is launched while its predecessor runs and the GEMVs load their first weight chunk
behind the norm or activation before them. The rule above still holds: each of them reads,
before its wait, only weights. `SGLITE_PDL_CHAIN=1` (or `pdl.CHAIN`, read at call time) turns it
on for every caller (benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # an older triton: no PDL
    _gdc_wait = _gdc_launch_dependents = None

ENABLED = os.environ.get("SGLITE_PDL", "1") != "0" and _gdc_wait is not None
EARLY_LAUNCH = os.environ.get("SGLITE_PDL_EARLY", "1") != "0"
CHAIN = os.environ.get("SGLITE_PDL_CHAIN", "0") == "1"


def use_pdl(t: torch.Tensor) -> bool:
    """Whether launches computing on t's device use PDL (a CUDA device of compute capability 9+)."""
    return ENABLED and t.is_cuda and _capability_major(t.device.index) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """With PDL, wait until the previous kernel has completed and its writes are visible."""
    if USE_PDL:
        _gdc_wait()


@triton.jit
def allow_dependents(EARLY: tl.constexpr):
    """Let the next kernel launch now (it still waits for this one before reading its output)."""
    if EARLY:
        _gdc_launch_dependents()


def pdl_options(t: torch.Tensor) -> dict:
    """Launch options for a kernel that calls wait_for_previous, computing on t's device: its
    USE_PDL constexpr and triton's launch_pdl (none on a CPU or a pre-Hopper GPU)."""
    return dict(USE_PDL=True, launch_pdl=True) if use_pdl(t) else {}


def early_launch(t: torch.Tensor) -> bool:
    """The EARLY constexpr of a kernel that calls allow_dependents, computing on t's device."""
    return EARLY_LAUNCH and use_pdl(t)


def chain_options(t: torch.Tensor, early: bool) -> dict:
    """Launch options of a kernel that calls allow_dependents after its wait (chained early
    launch): EARLY when the caller asks (or CHAIN, read now) and t's device launches early."""
    return {"EARLY": True} if (early or CHAIN) and early_launch(t) else {}
