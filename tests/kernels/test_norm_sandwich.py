"""norm_add_rms_norm (the sandwich norm pair of Gemma 2/3 in one launch) against the two launches
it replaces and against the plain-torch reference, with Gemma's fp32 (1 + w) weights and with
dtype weights; fresh random rows, outputs poisoned first (every element must be written)."""

import pytest
import torch

from sglite.kernels.norm import fused_add_rms_norm, norm_add_rms_norm, rms_norm, rms_norm_ref
from tests.kernels.pool import DEVICE, rel_err

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(rows, n, dtype, seed, fp32_weights):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 3).to(DEVICE, dtype)
    res = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    wdt = torch.float32 if fp32_weights else dtype
    w0 = (1 + 0.3 * torch.randn(n, generator=g)).to(DEVICE, wdt)
    w1 = (1 + 0.3 * torch.randn(n, generator=g)).to(DEVICE, wdt)
    return x, res, w0, w1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_weights", [True, False])
@pytest.mark.parametrize("rows,n,seed", [(1, 48, 0), (3, 40, 1), (2, 1000, 2)])
def test_equals_the_two_launches(dtype, fp32_weights, rows, n, seed):
    x, res, w0, w1 = _inputs(rows, n, dtype, seed, fp32_weights)
    # the two launches it replaces
    a = rms_norm(x.clone(), w0, 1e-6)
    ref_out, ref_res = fused_add_rms_norm(a, res.clone(), w1, 1e-5)
    # torch reference, same rounding steps
    t_out, t_res = rms_norm_ref(rms_norm_ref(x, w0, 1e-6), w1, 1e-5, residual=res)

    xx, rr = x.clone(), res.clone()
    out, new_res = norm_add_rms_norm(xx, rr, w0, w1, 1e-6, 1e-5)
    assert out.data_ptr() == xx.data_ptr() and new_res.data_ptr() == rr.data_ptr()  # in place
    assert torch.isfinite(out).all() and torch.isfinite(new_res).all()
    assert torch.equal(out, ref_out) and torch.equal(new_res, ref_res)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out.float(), t_out.float()) < tol
    assert rel_err(new_res.float(), t_res.float()) < tol


def test_every_element_written():
    x, res, w0, w1 = _inputs(4, 300, torch.float32, 3, True)
    ref_out, ref_res = rms_norm_ref(rms_norm_ref(x, w0, 1e-6), w1, 1e-6, residual=res)
    out, new_res = norm_add_rms_norm(x, res, w0, w1, 1e-6, 1e-6)
    assert not torch.isnan(out).any() and not torch.isnan(new_res).any()
    assert rel_err(out, ref_out) < 1e-5 and rel_err(new_res, ref_res) < 1e-5


def test_shape_errors():
    x, res, w0, w1 = _inputs(2, 16, torch.float32, 4, True)
    with pytest.raises(ValueError):
        norm_add_rms_norm(x, res[:1], w0, w1, 1e-6, 1e-6)
    with pytest.raises(ValueError):
        norm_add_rms_norm(x, res, w0[:8], w1, 1e-6, 1e-6)
