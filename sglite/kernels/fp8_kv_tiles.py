"""The per-tile steps of decode attention over an FP8 (e4m3) KV pool (sglite.kernels.decode_attention):
the values handed over as int16 byte pairs and widened to fp16 in registers, and the variant with
q rounded to e4m3 whose q.K^T runs on the FP8 matrix units with the keys as the product's rows."""

import triton
import triton.language as tl

from .online_softmax import softcap, softmax_weights


@triton.jit
def fp8_values_step(qk, pairs, v_scale, m_i, l_i, acc, WIDEN_ASM: tl.constexpr):
    """online_softmax_step for FP8 values handed over as int16 [N, D / 2] (two e4m3 values each),
    widened to fp16 [N, D] in registers before the dot. Loaded as fp8 [N, D], the compiler kept
    them FP8 up to the dot and read the operand (the tile transposed: keys along its K axis)
    from shared memory byte by byte: an LDS.U8 per value, 64 a thread per 64-key tile (sm90 SASS,
    bench/fp8_compile_check.py); widened first, the fp16 tile goes through shared memory as
    16-byte stores and ldmatrix.trans loads. The V scale is folded into the weights."""
    p, alpha, l_i, m_i = softmax_weights(qk, m_i, l_i)
    v = widen_pairs(pairs, WIDEN_ASM)
    acc = acc * alpha[:, None] + tl.dot((p * v_scale).to(tl.float16), v)
    return acc, l_i, m_i


@triton.jit
def fp8_keys_step(q, k, mask_n, pairs, qk_scale, logit_cap, v_scale, m_i, l_i, acc_t,
                   HAS_CAP: tl.constexpr, WIDEN_ASM: tl.constexpr):
    """One tile with q and K both FP8 (Q_FP8), computed transposed so that the keys are the
    products' M axis: scores [N, H] = K q^T with K [N, D] and q [H, D] both K-major, as an FP8
    MMA needs (H, the padded query heads of the group, is too few rows to be M: 64 a warpgroup),
    and acc_t [D, H] += V^T P^T with the values widened to fp16 (D = 128 rows). qk_scale [1, H]
    holds each head row's q scale; m_i, l_i [H] as in the other steps."""
    s = tl.dot(k, tl.trans(q))  # [N, H] fp32
    s = tl.where(mask_n[:, None], softcap(s * qk_scale, logit_cap, HAS_CAP), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, 0)
    v = widen_pairs(pairs, WIDEN_ASM)  # [N, D] fp16
    acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), (p * v_scale).to(tl.float16))
    return acc_t, l_i, m_new


@triton.jit
def widen_pairs(x, WIDEN_ASM: tl.constexpr):
    """int16 [R, C] of e4m3 pairs (little-endian: the low byte is the even element) -> fp16
    [R, 2C]. On the GPU one cvt.rn.f16x2.e4m3x2 a pair (the bitwise form costs ~3 more integer
    ops a value there); bitwise in the interpreter, which runs no inline asm."""
    if WIDEN_ASM:
        lo, hi = widen_pairs_apart(x, 1)
    else:
        lo, hi = widen_pairs_apart(x, 0)
    return tl.interleave(lo, hi)


@triton.jit
def fp8_values_split_step(qk, pairs, v_scale, m_i, l_i, acc_even, acc_odd, WIDEN: tl.constexpr):
    """fp8_values_step with the values' even and odd columns as two products, acc_even and
    acc_odd [R, D / 2]: each byte of an int16 pair widened on its own, so the tile keeps the
    pairs' shape [N, D / 2] up to the dots and the compiler can move the widening past the
    operand's layout change (16-bit ldmatrix.trans from shared memory, then a widening in
    registers) as it does for the keys, instead of widening first and storing the fp16 tile back
    to shared memory for the transposed load. The caller interleaves the two accumulators."""
    p, alpha, l_i, m_i = softmax_weights(qk, m_i, l_i)
    even, odd = widen_pairs_apart(pairs, WIDEN)
    pw = (p * v_scale).to(tl.float16)
    acc_even = acc_even * alpha[:, None] + tl.dot(pw, even)
    acc_odd = acc_odd * alpha[:, None] + tl.dot(pw, odd)
    return acc_even, acc_odd, l_i, m_i


@triton.jit
def widen_pairs_apart(x, WIDEN: tl.constexpr):
    """int16 [R, C] of e4m3 pairs -> (even, odd) fp16 [R, C]: widen_pairs without the interleave.
    WIDEN 0: integer ops (the interpreter); 1: one PTX conversion a pair; 3: two pairs a call,
    their low bytes and their high bytes gathered first (prmt), so that each conversion gives one
    fp16x2 register of the result as it stands."""
    if WIDEN == 3:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 u, w; prmt.b32 t, $2, 0, 0x3120; mov.b32 {u, w}, t; "
            "cvt.rn.f16x2.e4m3x2 $0, u; cvt.rn.f16x2.e4m3x2 $1, w; }",
            "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    elif WIDEN == 1:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
            "=h,=h,h", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        hi = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return lo, hi
