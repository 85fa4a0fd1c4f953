"""Compile the kernels a Gemma-2 decode step launches for Hopper (sm90) without a GPU (the
recorder of bench/fp8_compile_check.py): soft-capped decode / extend attention at head_dim 256
with and without a window, GeGLU, the norms with Gemma's fp32 (1 + w) weight, rotary at d=256.
Catches what the interpreter lets through (a non-constexpr global read in a jit function did).

    .venv/bin/python bench/gemma_compile_check.py
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction

import bench.fp8_compile_check as cc


def main():
    JITFunction.run = cc._record
    from sglite.kernels import decode_attention as da
    from sglite.kernels import extend_attention as ea
    from sglite.kernels.activation import gelu_tanh_and_mul
    from sglite.kernels.norm import fused_add_rms_norm, norm_add_rms_norm, rms_norm
    from sglite.kernels.rotary import apply_rotary_qk

    da._tma_device = lambda device: True
    heads, kv_heads, dim, hidden = 16, 8, 256, 3584
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    k_buf = torch.zeros(4096, kv_heads, dim, dtype=torch.bfloat16)
    v_buf = torch.zeros_like(k_buf)
    for window in (None, 4096):
        for splits in (1, 4):
            q = torch.zeros(1, heads, dim, dtype=torch.bfloat16)
            da.decode_attention_fwd(q, k_buf, v_buf, torch.empty_like(q), torch.zeros(2, 1024, dtype=torch.int32),
                                    torch.arange(1), i32(512), scale=256**-0.5, num_splits=splits,
                                    sliding_window=window, logit_cap=50.0,
                                    tiles=da.decode_tiles(dim, device=cc._CUDA, num_splits=splits))
            cc.compile_recorded(f"decode cap window {window} splits {splits}")
        q = torch.zeros(64, heads, dim, dtype=torch.bfloat16)
        new = torch.zeros(64, kv_heads, dim, dtype=torch.bfloat16)
        ea.extend_attention_fwd(q, new, new, torch.empty_like(q), k_buf, v_buf, torch.zeros(2, 1024, dtype=torch.int32),
                                torch.arange(2), i32(0, 10), i32(32, 32), i32(0, 32), max_extend_len=32,
                                scale=256**-0.5, sliding_window=window, logit_cap=50.0,
                                tiles=ea.extend_tiles(dim, 2, device=cc._CUDA))
        cc.compile_recorded(f"extend cap window {window}")
    x = torch.zeros(1, hidden, dtype=torch.bfloat16)
    w = torch.zeros(hidden, dtype=torch.float32)
    rms_norm(x, w, 1e-6)
    fused_add_rms_norm(x, torch.zeros_like(x), w, 1e-6)
    norm_add_rms_norm(x, torch.zeros_like(x), w, w, 1e-6, 1e-6)
    cc.compile_recorded("norms, fp32 (1 + w)")
    from sglite.kernels.gemv import gemv

    for n, k in ((8192, hidden), (hidden, 4096), (2 * 14336, hidden), (hidden, 14336)):
        gemv(torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.bfloat16))
    cc.compile_recorded("gemv qkv / o / gate_up / down")
    gelu_tanh_and_mul(torch.zeros(1, 2 * 14336, dtype=torch.bfloat16))
    cc.compile_recorded("gelu_tanh_and_mul")
    qkv = torch.zeros(1, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    cos = torch.zeros(1, dim // 2)
    apply_rotary_qk(q.view(1, heads, dim), k.view(1, kv_heads, dim), cos, cos, v=v.view(1, kv_heads, dim),
                    k_buffer=k_buf, v_buffer=v_buf, loc=torch.arange(1))
    cc.compile_recorded("rotary + store, d=256")


if __name__ == "__main__":
    main()
