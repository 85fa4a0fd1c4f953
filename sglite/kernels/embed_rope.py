"""The first launch of a decode step: the token embedding rows, scaled, and the rotary cos / sin
of the positions, in one launch (Gemma: the torch code was five: gather, scale, the position x
frequency product, cos, sin; each a few microseconds at batch 1, before the first layer).

Rounded as that torch code: out = round(row * scale) with scale the fp32 value of Gemma's bf16
sqrt(hidden) (ATen multiplies a 16-bit tensor by a host scalar in fp32), freqs = float(position)
* inv_freq in fp32, cos / sin libdevice's cosf / sinf (tl.cos / tl.sin on CUDA, as ATen's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import allow_dependents, chain_options, pdl_options, wait_for_previous

BLOCK_H = 1024


@triton.jit
def _embed_rope_kernel(Ids, W, Out, Pos, Inv, Cos, Sin, H, HALF, stride_w, stride_o, scale,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False,
                       EARLY: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    wait_for_previous(USE_PDL)  # the ids and positions come from the kernel before (graph inputs)
    allow_dependents(EARLY)  # pdl.chain_options: the first norm launches now
    tok = tl.load(Ids + t).to(tl.int64)
    offs = c * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    row = tl.load(W + tok * stride_w + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_o + offs, (row * scale).to(Out.dtype.element_ty), mask=mask)
    if c == 0:
        j = tl.arange(0, BLOCK_R)
        mj = j < HALF
        freqs = tl.load(Pos + t).to(tl.float32) * tl.load(Inv + j, mask=mj, other=0.0)
        tl.store(Cos + t * HALF + j, tl.cos(freqs), mask=mj)
        tl.store(Sin + t * HALF + j, tl.sin(freqs), mask=mj)


def embed_rope(ids: torch.Tensor, weight: torch.Tensor, scale: float, positions: torch.Tensor,
               inv_freq: torch.Tensor, *, early: bool = False):
    """ids, positions [T] int; weight [V, H] (rows contiguous); inv_freq fp32 [D / 2] ->
    (round(weight[ids] * scale) [T, H] in weight's dtype, cos, sin fp32 [T, D / 2]). early: the
    next kernel may launch once this one's programs have waited (pdl.py, chained early launch)."""
    if ids.dim() != 1 or positions.shape != ids.shape or weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError(f"embed_rope: ids {tuple(ids.shape)}, positions {tuple(positions.shape)}, "
                         f"weight {tuple(weight.shape)} (need [T], [T], [V, H] contiguous rows)")
    if inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or inv_freq.stride(-1) != 1:
        raise ValueError(f"embed_rope: inv_freq must be fp32 [D / 2], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    num_tokens, (_, hidden), half = ids.shape[0], weight.shape, inv_freq.shape[0]
    out = torch.empty(num_tokens, hidden, dtype=weight.dtype, device=weight.device)
    cos = torch.empty(num_tokens, half, dtype=torch.float32, device=weight.device)
    sin = torch.empty_like(cos)
    if num_tokens == 0:
        return out, cos, sin
    block_h = min(BLOCK_H, triton.next_power_of_2(hidden))
    _embed_rope_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        ids, weight, out, positions, inv_freq, cos, sin, hidden, half, weight.stride(0), out.stride(0),
        float(scale), BLOCK_H=block_h, BLOCK_R=triton.next_power_of_2(half),
        num_warps=4 if weight.is_cuda else 1, **pdl_options(weight), **chain_options(weight, early))
    return out, cos, sin
