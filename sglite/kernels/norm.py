"""RMSNorm, alone or fused with the residual add before it, one launch per call.

Rounding follows the unfused torch code (transformers' LlamaRMSNorm) step by step, so that the
fused path only differs from it by the fp32 reduction order:
  residual = round(x + residual)                      (the `x + residual` of the decoder layer)
  out = round(round(residual * rsqrt(mean(residual^2) + eps)) * weight)   (statistics in fp32)
One program normalizes one row held whole in registers (hidden sizes up to MAX_N); rows are
disjoint and each is read before it is written, so outputs may alias the inputs (in place).

`norm_add_rms_norm` is two of these in one launch, for sandwich-norm layers (Gemma 2/3: a
sublayer's output is normed before it joins the residual stream, and the stream is normed again
for the next sublayer): x <- rms_norm(x, w0) is rounded exactly as the standalone launch stores
it, then added to the residual and normed with w1 as `fused_add_rms_norm` does. At batch 1 these
norms are single-program launches of a few microseconds each: one launch instead of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import allow_dependents, chain_options, pdl_options, wait_for_previous

MAX_N = 65536  # one row in registers: 64k fp32 over 16 warps is 128 values per thread
NUM_WARPS: int | None = None  # overrides the warps a row gets (benchmarks; read at call time)


@triton.jit
def _rms_norm_kernel(
    X, Residual, Out, W, W0,
    stride_x, stride_r, stride_o,
    N, eps, eps0,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
    PRE_NORM: tl.constexpr = False,  # x <- rms_norm(x, W0, eps0) first (norm_add_rms_norm)
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,  # pdl.chain_options: the next kernel launches after the wait
):
    cur_row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # the weights before the wait: no kernel of the forward writes them (pdl.py)
    w = tl.load(W + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if PRE_NORM:
        w0 = tl.load(W0 + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)
    x = tl.load(X + cur_row * stride_x + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if PRE_NORM:  # rounded as the standalone norm stores it
        rstd0 = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps0)
        x = ((x * rstd0).to(Out.dtype.element_ty).to(tl.float32) * w0).to(Out.dtype.element_ty)
        x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + cur_row * stride_r + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        x = (x + r).to(Residual.dtype.element_ty)  # rounded as the unfused add rounds
        tl.store(Residual + cur_row * stride_r + offs_n, x, mask=mask_n)
        x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    y = (x * rstd).to(Out.dtype.element_ty).to(tl.float32) * w
    tl.store(Out + cur_row * stride_o + offs_n, y.to(Out.dtype.element_ty), mask=mask_n)


def _check(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name}: need a 2D [rows, hidden] tensor with a contiguous last axis, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != ({x.shape[1]},)")
    if x.shape[1] > MAX_N:
        raise ValueError(f"{name}: hidden size {x.shape[1]} > {MAX_N} (one row per program)")


def _launch(x, residual, out, weight, eps, pre_weight=None, pre_eps=0.0, early=False):
    rows, n = x.shape
    if rows == 0:
        return
    block_n = triton.next_power_of_2(n)
    r = residual if residual is not None else x  # unused pointer when HAS_RESIDUAL is off
    _rms_norm_kernel[(rows,)](
        x, r, out, weight, pre_weight if pre_weight is not None else weight,
        x.stride(0), r.stride(0), out.stride(0),
        n, eps, pre_eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, PRE_NORM=pre_weight is not None,
        num_warps=(NUM_WARPS or min(16, max(1, block_n // 512))) if x.is_cuda else 1, **pdl_options(x),
        **chain_options(x, early),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: torch.Tensor | None = None, early: bool = False) -> torch.Tensor:
    """x [rows, N] -> normalized [rows, N] in x's dtype (into `out`, which may be x). early: the
    next kernel may launch once this one's programs have waited (pdl.py, chained early launch;
    also on under pdl.CHAIN) -- for callers whose next kernel is a PDL launch (the GEMV)."""
    _check(x, weight, "rms_norm")
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"rms_norm: out {tuple(out.shape)} does not match x {tuple(x.shape)}")
    _launch(x, None, out, weight, eps, early=early)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, *, early: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual, x <- rms_norm(residual). Returns (x, residual)."""
    _check(x, weight, "fused_add_rms_norm")
    if residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} "
                         f"does not match x {tuple(x.shape)} {x.dtype}")
    _launch(x, residual, x, weight, eps, early=early)
    return x, residual


def norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, pre_weight: torch.Tensor,
                      weight: torch.Tensor, pre_eps: float, eps: float, *, early: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, one launch: residual <- rms_norm(x, pre_weight) + residual,
    x <- rms_norm(residual, weight). Returns (x, residual); equal to rms_norm followed by
    fused_add_rms_norm."""
    _check(x, weight, "norm_add_rms_norm")
    _check(x, pre_weight, "norm_add_rms_norm")
    if residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype:
        raise ValueError(f"norm_add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} "
                         f"does not match x {tuple(x.shape)} {x.dtype}")
    _launch(x, residual, x, weight, eps, pre_weight, pre_eps, early=early)
    return x, residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """Plain torch, same rounding steps; returns out, or (out, new residual) with a residual."""
    if residual is not None:
        residual = x + residual
        x = residual
    y = x.float()
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (y.float() * weight.float()).to(x.dtype)
    return out if residual is None else (out, residual)
