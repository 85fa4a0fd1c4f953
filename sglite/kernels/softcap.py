"""Final-logit soft-capping with the fp32 cast, one launch: out = cap * tanh(x / cap) in fp32.

Gemma 2's LM head leaves bf16 logits [rows, vocab] (256000 a row); the torch code after it,
`logits.float()`, `/ cap`, `tanh`, `* cap`, is four launches of ~1 MB each. Rounded as that torch
code on CUDA: x / cap there is x * (1 / cap) (ATen divides by a host scalar through its fp32
reciprocal), tanh is libdevice's tanhf (CUDA's tanhf, as ATen's), and the product by cap is the
same fp32 multiply. The interpreter has no libdevice, so there tanh is 1 - 2 / (e^2t + 1) (a
few ulps of fp32 apart). cap None: the cast alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_options, wait_for_previous

try:
    from triton.language.extra.cuda import libdevice
except ImportError:  # an older triton
    libdevice = None

BLOCK = 1024


@triton.jit
def _softcap_kernel(X, Out, N, stride_x, stride_o, inv_cap, cap, HAS_CAP: tl.constexpr,
                    LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_for_previous(USE_PDL)  # the logits come from the LM head before
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CAP:
        t = x * inv_cap
        if LIBDEVICE:
            th = libdevice.tanh(t)
        else:  # clamped: e^80 is finite in fp32 and makes tanh exactly 1 already
            th = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * t, 80.0)) + 1.0)
        x = th * cap
    tl.store(Out + row * stride_o + offs, x, mask=mask)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """logits [rows, V] (16-bit or fp32, last axis contiguous) -> fp32 [rows, V]:
    cap * tanh(logits / cap), or the cast alone for cap None."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"softcap_logits: need [rows, V] with a contiguous last axis, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    rows, n = logits.shape
    out = torch.empty(rows, n, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    # the reciprocal as ATen forms it (fp32 division), so the product rounds as its x / cap
    inv_cap = float(torch.tensor(1.0) / torch.tensor(float(cap))) if cap is not None else 1.0
    _softcap_kernel[(triton.cdiv(n, BLOCK), rows)](
        logits, out, n, logits.stride(0), out.stride(0), inv_cap, float(cap or 1.0),
        HAS_CAP=cap is not None, LIBDEVICE=logits.is_cuda and libdevice is not None, BLOCK=BLOCK,
        num_warps=4 if logits.is_cuda else 1, **pdl_options(logits))
    return out


def softcap_logits_ref(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The torch code it replaces."""
    logits = logits.float()
    return logits if cap is None else torch.tanh(logits / cap) * cap
