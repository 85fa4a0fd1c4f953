"""RMSNorm (optionally fused with the residual add), numerically matched to transformers."""

from __future__ import annotations

import torch
from torch import nn

from sglite.runtime.models.layers.fused import use_fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., dim] -> normed; with a residual: (normed, x + residual), the fused-residual
        pattern of the decoder layer. On CUDA with a residual both are updated in place."""
        if use_fused(x):
            from sglite.kernels.norm import fused_add_rms_norm, rms_norm

            if residual is not None:
                return fused_add_rms_norm(x, residual, self.weight, self.eps)
            rows = x.reshape(-1, x.shape[-1])  # a copy only for strided per-head views (qk_norm)
            return rms_norm(rows, self.weight, self.eps).view(x.shape)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then back to the input dtype before the weight (as transformers does)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
