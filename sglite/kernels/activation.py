"""silu(gate) * up (SwiGLU) or gelu_tanh(gate) * up (GeGLU, Gemma) from the fused gate_up
projection output, one launch.

x [T, 2I] holds gate in [:, :I] and up in [:, I:]; out [T, I]. Rounding follows the unfused
`F.silu(gate) * up`: silu in fp32 rounded to the dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import allow_dependents, chain_options, pdl_options, wait_for_previous

BLOCK_N = 1024


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
                         GELU: tl.constexpr = False, EARLY: tl.constexpr = False):
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)  # pdl.chain_options: the down projection's GEMV launches now
    cur_row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    gate = tl.load(X + cur_row * stride_x + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    up = tl.load(X + cur_row * stride_x + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Out + cur_row * stride_o + offs_n, act_and_mul(gate, up, Out, GELU), mask=mask_n)


@triton.jit
def act_and_mul(gate, up, Out, GELU: tl.constexpr):
    """act(gate) * up from fp32 gate / up, rounded as the unfused ops (act to Out's dtype, then the
    product); also the gate_up GEMV's GLU epilogue (gemv_pairs.py)."""
    if GELU:  # gelu_pytorch_tanh: 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = (gate / (1.0 + tl.exp(-2.0 * u))).to(Out.dtype.element_ty).to(tl.float32)
    else:
        act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    return (act * up).to(Out.dtype.element_ty)


def gelu_tanh_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None, early: bool = False) -> torch.Tensor:
    """x [T, 2I] -> gelu(gate, approximate="tanh") * up, [T, I] in x's dtype."""
    return silu_and_mul(x, out=out, _gelu=True, early=early)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None, _gelu: bool = False,
                 early: bool = False) -> torch.Tensor:
    """x [T, 2I] -> [T, I] in x's dtype. early: the next kernel may launch once this one's
    programs have waited (pdl.py, chained early launch; also on under pdl.CHAIN)."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: need [T, 2I] with a contiguous last axis, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    num_tokens, n = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    if out.shape != (num_tokens, n) or out.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"silu_and_mul: out {tuple(out.shape)} {out.dtype} != ({num_tokens}, {n}) {x.dtype}")
    if num_tokens == 0:
        return out
    block = min(BLOCK_N, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK_N=block, num_warps=4 if x.is_cuda else 1,
        GELU=_gelu, **pdl_options(x), **chain_options(x, early),
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
