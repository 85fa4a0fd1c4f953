"""Host-to-device copies that never wait for the GPU.

CUDA stages a copy from pageable host memory by synchronizing with the stream, so a small
`torch.tensor(..., device="cuda")` on the scheduler's path waits for the forward in flight, and
the overlapped decode loop would leave the GPU idle until it launches the next one (H200,
Llama-3-8B bs 1 through `sglite serve`: 4.74 -> 4.59 ms/token once the decode batch went through
pinned memory; docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """host on `device`; on CUDA through pinned memory from torch's caching host allocator, which
    keeps the block until the copy has run."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def tensor_async(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device) without the synchronizing copy."""
    return to_device_async(torch.tensor(values, dtype=dtype), device)


def copy_to_device_async(dst: torch.Tensor, host: torch.Tensor) -> None:
    """dst.copy_(host) without the synchronizing copy (dst on the device, host on the CPU)."""
    if dst.device.type != "cuda":
        dst.copy_(host)
    else:
        dst.copy_(host.pin_memory(), non_blocking=True)
