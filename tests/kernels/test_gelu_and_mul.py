"""GeGLU (Gemma's gelu_pytorch_tanh(gate) * up) in the fused activation kernel against torch."""

import pytest
import torch

from sglite.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul_ref
from tests.kernels.test_fused_layers import DEVICE, DTYPES, assert_close, randn


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul(dtype):
    x = 3 * randn(3, 2 * 1100, dtype=dtype)  # two column blocks, the second ragged; both tails of gelu
    out = torch.full((3, 1100), float("nan"), dtype=dtype, device=DEVICE)
    gelu_tanh_and_mul(x, out=out)
    assert_close(out, gelu_tanh_and_mul_ref(x), dtype)
    assert not torch.allclose(out.float(), silu_and_mul_ref(x).float(), atol=1e-2)
