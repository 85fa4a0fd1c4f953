"""The fused layer kernels (RMSNorm +- residual add, rotary on q/k, silu*mul) against their
plain-torch references, and the references against the model's torch path (same layout, same
rounding). Tiny shapes under the interpreter on a CPU; real shapes and the whole model (fused vs
torch path, same weights) on a GPU."""

import pytest
import torch

from sglite.kernels.activation import silu_and_mul, silu_and_mul_ref
from sglite.kernels.norm import fused_add_rms_norm, rms_norm, rms_norm_ref
from sglite.kernels.rotary import apply_rotary_qk, apply_rotary_ref
from sglite.runtime.models import layers
from tests.kernels.pool import DEVICE, rel_err

needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
# bf16: a flipped rounding here and there; the interpreter truncates fp32 -> bf16 (no
# round-to-nearest), about one more ulp per rounding step
BF16_TOL = 4e-3 if DEVICE == "cuda" else 1e-2
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def assert_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert rel_err(out.float(), ref.float()) < (1e-5 if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x, w = randn(3, 48, dtype=dtype), randn(48, dtype=dtype, seed=1)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, w, 1e-5, out=out)
    assert_close(out, rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_in_place(dtype):
    x, res, w = randn(5, 40, dtype=dtype), randn(5, 40, dtype=dtype, seed=1), randn(40, dtype=dtype, seed=2)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, residual=res)
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr()
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(new_res, ref_res)  # one rounded add, as torch does it
    assert_close(new_res, ref_res, dtype)
    assert_close(out, ref_out, dtype)


def test_norm_ref_matches_model_torch_path():
    """The reference rounds exactly as the model's torch RMSNorm (transformers' order)."""
    norm = layers.RMSNorm(32, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(32).to(torch.bfloat16)
    x, res = torch.randn(4, 32).to(torch.bfloat16), torch.randn(4, 32).to(torch.bfloat16)
    assert torch.equal(norm(x), rms_norm_ref(x, norm.weight, 1e-5))
    out, new_res = norm(x, res)
    ref_out, ref_res = rms_norm_ref(x, norm.weight, 1e-5, residual=res)
    assert torch.equal(out, ref_out) and torch.equal(new_res, ref_res)


def qkv_views(num_tokens, heads, kv_heads, head_dim, dtype, seed=0):
    """q, k, v as strided views of one fused projection output, as the model has them."""
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(num_tokens, kv_heads, head_dim)
    return qkv, q, k, v


def cos_sin(positions, head_dim, scaling=None, theta=10000.0):
    rope = layers.RotaryEmbedding(head_dim, theta=theta, scaling=scaling)
    freqs = positions.float()[:, None] * rope.inv_freq_cpu.to(positions.device)[None, :]
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_k", [True, False], ids=["qk", "q-only"])
def test_rotary_in_place_on_views(dtype, with_k):
    qkv, q, k, v = qkv_views(3, 4, 2, 16, dtype)
    before = qkv.clone()
    cos, sin = cos_sin(torch.tensor([0, 5, 1000], device=DEVICE), 16)
    ref_q, ref_k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    apply_rotary_qk(q, k if with_k else None, cos, sin)
    assert_close(q, ref_q, dtype)
    if with_k:
        assert_close(k, ref_k, dtype)
    else:
        assert torch.equal(k, before[:, 64:96].view(3, 2, 16)), "k=None must leave k untouched"
    assert torch.equal(v, before[:, 96:].view(3, 2, 16)), "v must stay untouched"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_stores_kv_into_the_pool(dtype):
    """With the pool buffers, the same launch stores the rotated k and v at the tokens' slots
    (what store_kv does) and leaves every other slot alone."""
    qkv, q, k, v = qkv_views(4, 4, 2, 16, dtype, seed=3)
    cos, sin = cos_sin(torch.tensor([3, 0, 77, 2048], device=DEVICE), 16)
    ref_q, ref_k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    ref_v = v.clone()
    k_buf, v_buf = randn(10, 2, 16, dtype=dtype, seed=4), randn(10, 2, 16, dtype=dtype, seed=5)
    expected_k, expected_v = k_buf.clone(), v_buf.clone()
    loc = torch.tensor([7, 2, 9, 4], device=DEVICE)
    apply_rotary_qk(q, k, cos, sin, v=v, k_buffer=k_buf, v_buffer=v_buf, loc=loc)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    assert torch.equal(k_buf[loc], k) and torch.equal(v_buf[loc], ref_v)
    others = torch.tensor([i for i in range(10) if i not in loc.tolist()], device=DEVICE)
    assert torch.equal(k_buf[others], expected_k[others]) and torch.equal(v_buf[others], expected_v[others])
    with pytest.raises(ValueError, match="needs k, v"):
        apply_rotary_qk(q, k, cos, sin, k_buffer=k_buf, v_buffer=v_buf, loc=loc)


def test_rotary_ref_matches_model_layout():
    """Half-width fp32 cos/sin on [x1, x2] == the model's rotate_half with duplicated cos/sin.
    The reference computes in fp32: an absolute tolerance at fp32 rounding (a wrong layout is
    off by O(1)); unseeded with the default atol it failed now and then on a near-zero output."""
    x = torch.randn(4, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, sin = cos_sin(torch.tensor([1, 7, 300, 9000]), 16)
    cos, sin = cos.double(), sin.double()
    full = lambda t: torch.cat([t, t], -1)[:, None, :]  # noqa: E731
    assert torch.allclose(apply_rotary_ref(x, cos, sin), layers.apply_rotary(x, full(cos), full(sin)),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = randn(2, 2 * 1100, dtype=dtype)  # two column blocks, the second ragged
    out = torch.full((2, 1100), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x, out=out)
    assert_close(out, silu_and_mul_ref(x), dtype)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(randn(2, 8), randn(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(randn(2, 8), randn(3, 8), randn(8), 1e-5)
    with pytest.raises(ValueError, match="cos must be fp32"):
        apply_rotary_qk(randn(2, 4, 16), None, randn(2, 16), randn(2, 8))
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        silu_and_mul(randn(2, 7))


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter only; the GPU test below runs it compiled")
def test_model_dispatch_through_kernels_on_cpu(monkeypatch):
    """The model's fused branches (in-place residual, q/k rotated in the projection output,
    qk_norm on per-head views, CLA layers without K) driven through the interpreted kernels on
    the CPU: same logits as the torch path in fp32."""
    from sglite.runtime.executor.model_runner import ModelRunner

    runner = ModelRunner(preset="tiny", load_format="dummy", device="cpu", dtype="float32",
                         config_overrides=dict(qk_norm=True, cla_factor=2), max_total_tokens=256,
                         max_running_requests=2, attention_backend="torch")
    extend = runner.make_extend_batch([runner.req_to_token.alloc() for _ in range(2)], [0, 0],
                                      [[5, 6, 7], [8, 9, 10, 11, 12]], runner.token_pool.alloc(8))
    ref = runner.forward(extend).clone()
    for module in (layers.norm, layers.rotary, layers.mlp):
        monkeypatch.setattr(module, "use_fused", lambda x: True)
    out = runner.forward(extend)
    assert rel_err(out, ref) < 1e-5


# --- GPU: real shapes, and the model fused vs torch path ------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("hidden", [2048, 4096, 5120])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_real_shapes(rows, hidden, with_residual):
    x, w = randn(rows, hidden, dtype=torch.bfloat16), 1 + 0.1 * randn(hidden, dtype=torch.bfloat16, seed=1)
    res = randn(rows, hidden, dtype=torch.bfloat16, seed=2)
    if with_residual:
        ref_out, ref_res = rms_norm_ref(x, w, 1e-5, residual=res)
        out, new_res = fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
        assert torch.equal(new_res, ref_res)
    else:
        ref_out, out = rms_norm_ref(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert_close(out, ref_out, torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (32, 8, 64), (14, 2, 64), (8, 1, 256)])
def test_rotary_real_shapes(heads, kv_heads, head_dim):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    positions = torch.randint(0, 131072, (257,), device=DEVICE)
    cos, sin = cos_sin(positions, head_dim, scaling, theta=500000.0)
    _, q, k, _ = qkv_views(257, heads, kv_heads, head_dim, torch.bfloat16)
    ref_q, ref_k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    apply_rotary_qk(q, k, cos, sin)
    assert_close(q, ref_q, torch.bfloat16)
    assert_close(k, ref_k, torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rows", [1, 300])
def test_silu_real_shapes(rows):
    x = randn(rows, 2 * 14336, dtype=torch.bfloat16)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x), torch.bfloat16)


def _logits(runner, prompts):
    """Extend logits of every prompt, then one decode step's."""
    rows = [runner.req_to_token.alloc() for _ in prompts]
    slots = runner.token_pool.alloc(sum(len(p) for p in prompts))
    extend = runner.forward(runner.make_extend_batch(rows, [0] * len(prompts), prompts, slots)).clone()
    seq_lens = [len(p) + 1 for p in prompts]
    decode_slots = runner.token_pool.alloc(len(prompts))
    decode = runner.forward(runner.make_decode_batch(rows, seq_lens, [1] * len(prompts), decode_slots)).clone()
    for row in rows:
        runner.req_to_token.free(row)
    runner.token_pool.free(torch.cat([slots, decode_slots]))
    return extend, decode


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk-norm"])
def test_model_fused_matches_torch_path(monkeypatch, qk_norm):
    """bf16 logits through the fused kernels and through the torch ops, both against the same
    weights in fp32 (extend of ragged prompts with llama3 rope, then a decode step): the fused
    path is no less accurate. They cannot be compared bitwise: the fused rotary rotates in fp32
    with fp32 cos/sin, the torch path rounds cos/sin and each product to bf16, and on these
    random weights such roundings alone move the logits by ~1e-2 (split-count note, tests/gpu)."""
    from sglite.runtime.executor.model_runner import ModelRunner

    kw = dict(preset="llama-3.2-1b", load_format="dummy", device="cuda", max_total_tokens=4096,
              config_overrides=dict(num_layers=3, qk_norm=qk_norm), max_running_requests=4,
              max_context_len=2048, disable_cuda_graph=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in (5, 300, 1200)]
    monkeypatch.setattr(layers.fused, "FUSED_KERNELS", False)
    runner = ModelRunner(dtype="bfloat16", **kw)
    exact = ModelRunner(dtype="float32", attention_backend="torch", **kw)  # no tf32 dots
    for p32, p16 in zip(exact.model.parameters(), runner.model.parameters()):
        p32.data.copy_(p16.data)
    ref = _logits(exact, prompts)
    del exact
    errs = {}
    for fused in (False, True):  # each forward stores its own K/V before reading them
        monkeypatch.setattr(layers.fused, "FUSED_KERNELS", fused)
        errs[fused] = [rel_err(out, r) for out, r in zip(_logits(runner, prompts), ref)]
    print(f"\n{'qk-norm' if qk_norm else 'llama'} rel err vs fp32 (extend, decode): torch path "
          f"{errs[False][0]:.1e}, {errs[False][1]:.1e}; fused {errs[True][0]:.1e}, {errs[True][1]:.1e}")
    for i, name in enumerate(("extend", "decode")):
        assert errs[True][i] < 5e-2, f"{name}: fused path rel err {errs[True][i]:.2e} vs fp32"
        assert errs[True][i] <= 1.25 * errs[False][i], f"{name}: fused less accurate than torch ops"
