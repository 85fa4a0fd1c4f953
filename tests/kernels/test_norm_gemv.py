"""The one-row GEMV (sglite.kernels.gemv; under the interpreter on a CPU) against F.linear in
float64 on fresh random inputs: ragged N (past the last full row block), K not a multiple of
the chunk, fp32 / bf16; the output poisoned first."""

import pytest
import torch
import torch.nn.functional as F

from sglite.kernels.gemv import gemv
from tests.kernels.pool import DEVICE, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,cfg", [
    (24, 64, dict(BLOCK_N=8, BLOCK_K=32)),      # whole blocks, K = 2 chunks
    (21, 100, dict(BLOCK_N=8, BLOCK_K=32)),     # ragged N and K
    (5, 16, dict(BLOCK_N=8, BLOCK_K=64)),       # one chunk wider than K
    (40, 512, None),                            # the default tiles
])
def test_gemv_matches_linear(dtype, n, k, cfg):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    gemv(x, w, config=None if cfg is None else dict(cfg, num_warps=1, num_stages=1), out=out)
    ref = F.linear(x.double(), w.double())
    assert torch.isfinite(out).all()
    assert rel_err(out.double(), ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_gemv_shape_errors():
    with pytest.raises(ValueError):
        gemv(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError):
        gemv(torch.randn(1, 8), torch.randn(4, 9))
