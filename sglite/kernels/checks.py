"""Shape checks shared by the attention launchers (raise ValueError naming the mismatch)."""

from __future__ import annotations

import torch


def check_attention_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                           out: torch.Tensor, *, q_layout: str) -> None:
    """q/out [tokens, H, D] against pool buffers [slots, KH, D] with H a multiple of KH."""
    if q.dim() != 3 or k_buffer.dim() != 3 or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"expected q {q_layout} and K/V buffers [slots, KH, D], got "
                         f"{tuple(q.shape)}, {tuple(k_buffer.shape)}, {tuple(v_buffer.shape)}")
    if q.shape[2] != k_buffer.shape[2] or q.shape[1] % k_buffer.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} x dim {q.shape[2]} do not fit KV heads "
                         f"{k_buffer.shape[1]} x dim {k_buffer.shape[2]}")
    if out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
