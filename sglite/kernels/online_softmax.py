"""The online-softmax step shared by the decode and extend attention kernels (base 2)."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(qk, v_ptrs, mask_kv, m_i, l_i, acc, v_scale, V_FP8: tl.constexpr):
    """Fold one tile of keys into the running (m_i, l_i, acc): qk [R, N] scores already scaled by
    scale * log2(e) and masked with -inf; v_ptrs/mask_kv [N, D] the tile's values, loaded here
    (after the score math, as the kernels issued them before). Returns (acc, l_i, m_i).
    V_FP8: the values are FP8 (an FP8 KV pool), dequantized with v_scale."""
    p, alpha, l_i, m_new = softmax_weights(qk, m_i, l_i)
    v = tl.load(v_ptrs, mask=mask_kv, other=0.0)
    p, v = fp8_values(p, v, v_scale, V_FP8)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def values_step(qk, v, m_i, l_i, acc):
    """online_softmax_step on a tile of 16-bit values v [N, D] already loaded (a TMA tile, or
    rows gathered before the PDL wait). Returns (acc, l_i, m_i)."""
    p, alpha, l_i, m_new = softmax_weights(qk, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def fp8_values(p, v, v_scale, V_FP8: tl.constexpr):
    """FP8 values (an FP8 KV pool): widened to fp16 (exact for e4m3), their scale folded into the
    weights p (a [R, N] multiply instead of [N, D]); other values pass through. One return and
    a constexpr flag: two returns of different types fail to compile for the GPU (H200, Triton
    3.6), though the interpreter runs them."""
    if V_FP8:
        p = p * v_scale
        v = v.to(tl.float16)
    return p, v


@triton.jit
def softmax_weights(qk, m_i, l_i):
    """The tile's weights p [R, N], the rescale alpha [R] of what came before, and the new
    (l_i, m_i): the part of the step before the values (for callers that load them their way)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


_LOG2E = 1.4426950408889634


@triton.jit
def softcap(qk, logit_cap, HAS_CAP: tl.constexpr):
    """Scores for the base-2 softmax: with HAS_CAP, qk = q.k * scale is soft-capped (Gemma 2:
    cap * tanh(qk / cap), tanh as 1 - 2 / (e^2x + 1), exact at both saturations) and then
    scaled by log2(e); without it qk came scaled by scale * log2(e) already (softcap_args)."""
    if HAS_CAP:
        # clamped: e^80 is finite in fp32 and already makes tanh exactly 1 (no inf on the way);
        # log2(e) as a literal: compiled kernels may read only constexpr globals
        tanh = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * qk / logit_cap, 80.0)) + 1.0)
        return (logit_cap * 1.4426950408889634) * tanh
    return qk


def softcap_args(scale: float, logit_cap: float | None) -> tuple[float, float]:
    """(qk_scale, logit_cap) kernel arguments for softcap()."""
    if logit_cap is None:
        return scale * _LOG2E, 0.0
    if logit_cap <= 0:
        raise ValueError(f"logit_cap must be > 0, got {logit_cap}")
    return scale, float(logit_cap)
