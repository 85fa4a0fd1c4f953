"""Batch-1 projections whose one-row GEMV (gemv.py) programs own a pair of rows, with an
epilogue over the pair: one launch for what the GEMV and the small kernel after it did in two.

Each program streams its two weight rows as the one-row GEMV does (gemv.stream_rows: the first
weight chunk loaded before the PDL wait), rounds both sums to the output dtype (the projection's
output as the next kernel would read it) and then:

- `gemv_rope` (the fused [q heads | k heads | v heads] x head_dim qkv projection): the pair is
  dims j and j + head_dim / 2 of one head ("rotate_half" layout); q and k rows are rotated in
  fp32 by the token's (cos, sin)[j] and rounded once, as rotary.py does, and written to the
  output (q and k come back rotated, as the in-place rotary leaves them); k and v rows are also
  stored into the pool's K / V buffers at the token's slot. Replaces the single-program rotary
  launch (with its KV store) between the qkv GEMV and decode attention.
- `gemv_glu` (the fused [gate | up] projection, I rows each): the pair is gate row j and up row
  I + j; the program writes act(gate) * up (activation.act_and_mul: SwiGLU or GeGLU, rounded as
  the activation kernel) to out[j]. Replaces the activation launch between gate_up and down.

With `norm=` either also runs the sandwich norm pair before it (Gemma's post-norm of the last
sublayer, the residual add and the next pre-norm) in its prologue, from the raw sublayer output
(stream_rows_normed; off in the model unless NORM: twice as slow, see NORM below).

Both let the next kernel launch right after their wait (early launch, pdl.py): decode attention
or the down projection's GEMV. Same bits as the two launches they replace under the interpreter
(tests/kernels/test_gemv_pairs.py), and compiled on an H200 at Gemma-2-9B's shapes alone
(bench/gemv_pairs_check.py, 2026-12-04: gemv_rope's 8192 outputs and pool rows equal to the GEMV
+ rotary launches', 0 ulps; gemv_glu bit-equal). In the model's graph gemv_glu's logits are
bit-equal, gemv_rope's are not (max abs logit difference 0.109 after 8 steps, same argmax): in the
model (bench/decode_floor.py --rope-check, eager, same state) the first tensor that differs is
q or k going into attention, in one element (1 of 4096 q in layer 1 / 1 of 2048 k in layer 7, by
1.9e-6 / 7.6e-6: a bf16 spacing at small values) in two of three steps, none in the third, and
the logits of all three stay bit-equal: fp32 rotations one rounding apart (FMA contraction,
likely) that bf16 rounding hides almost always; the graphs first differ at step 2, through the KV
cache, random weights amplifying it. Not a race: with attention not launched early the graphs
are bit-equal to the served ones. For one token (batch-1 decode). gemv_rope: full rotary, no
q/k norms between projection and rotation (Gemma 2; Gemma 3's q/k norms keep the two launches),
a pool of the activation's dtype. `ROPE` / `GLU` (SGLITE_GEMV_ROPE=0 / SGLITE_GEMV_GLU=0 turn
them off; read at call time by the model, so benchmarks may flip them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .activation import act_and_mul
from .gemv import depth, prefetch_lines, prefetch_rows, stream_rows
from .pdl import allow_dependents, chain_options, pdl_options, wait_for_previous

ROPE = os.environ.get("SGLITE_GEMV_ROPE", "1") != "0"
GLU = os.environ.get("SGLITE_GEMV_GLU", "1") != "0"
# the sandwich pair inside the projection: checked on the CPU (interpreted, against float64 and
# transformers) and compiled on an H200 (bench/gemv_pairs_check.py: rel err vs float64 as the
# unfused path's), but twice as slow (2026-12-04, bench/decode_floor.py --variants: Gemma-2-9B's
# batch-1 replay 5.31 -> 9.50-10.74 ms over the three tiles below): every program of two rows
# reloads the four K-long vectors (o, residual, two fp32 norm weights: 12 bytes a column for 4 of
# weights) and runs six accumulators, so the vector work outweighs the weights it saves a launch
# for. Off: SGLITE_GEMV_NORM=1 (or NORM, read at call time) turns it on
NORM = os.environ.get("SGLITE_GEMV_NORM", "0") == "1"
# tiles: the plain pair GEMV as gemv_config's for Gemma 2's rows (2 x 512, 4 warps); with the norm
# prologue, whose six accumulators take 118 registers a thread at 512 columns and 4 warps (4
# programs an SM; sm_90 cubin, the plain one 38), 8 warps (64 registers, 32 warps an SM) or 256
# columns and 4 warps (70, 28 warps): NORM_TILES (benchmarks may set it)
TILES = dict(block_k=512, num_warps=4)
NORM_TILES = dict(block_k=512, num_warps=8)


@triton.jit
def stream_rows_normed(O, Res, G1, G2, Res_out, W, rows, K, stride_wn, eps1, eps2,
                       BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr,
                       PREFETCH: tl.constexpr):
    """W[rows] . norm2(Res + norm1(O)) in fp32, norm_i(v) = v * rsqrt(mean(v^2) + eps_i) * G_i
    (G fp32: Gemma's 1 + w), in one pass over K: with u = G1 * O and r = Res,
    W.(G2 * (r + a u)) = W.(G2 r) + a W.(G2 u) and sum (r + a u)^2 = rr + 2a ru + a^2 uu for
    a = rstd1 = rsqrt(mean(O^2) + eps1), so two dot accumulators and four sums, all of them
    over the whole row that every program streams anyway. Program c also writes chunk c of the
    new residual stream Res + a u to Res_out (a buffer of its own: other programs still read Res).
    Everything in fp32, rounded once (the sandwich-norm kernel rounds each norm's output and the
    sum to the dtype first)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_k8 = tl.max_contiguous(offs_k, 8)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k8[None, :]
    xo = (rows * 0)[:, None] + offs_k8[None, :]  # the row's offsets, the same in every tile row
    w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0)  # weights only before the wait
    if PREFETCH > 0:
        prefetch_rows(W, rows, K, stride_wn, BLOCK_K, PREFETCH)
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)
    acc_r = tl.zeros(w.shape, dtype=tl.float32)
    acc_u = tl.zeros(w.shape, dtype=tl.float32)
    s_oo = tl.zeros(w.shape, dtype=tl.float32)
    s_rr = tl.zeros(w.shape, dtype=tl.float32)
    s_ru = tl.zeros(w.shape, dtype=tl.float32)
    s_uu = tl.zeros(w.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m = (k0 + offs_k < K)[None, :]
        o = tl.load(O + xo + k0, mask=m, other=0.0).to(tl.float32)
        r = tl.load(Res + xo + k0, mask=m, other=0.0).to(tl.float32)
        g1 = tl.load(G1 + xo + k0, mask=m, other=0.0)
        g2 = tl.load(G2 + xo + k0, mask=m, other=0.0)
        w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=(k0 + BLOCK_K + offs_k < K)[None, :], other=0.0)
        u = g1 * o
        wf = w.to(tl.float32)
        acc_r += wf * (g2 * r)
        acc_u += wf * (g2 * u)
        s_oo += o * o
        s_rr += r * r
        s_ru += r * u
        s_uu += u * u
        w = w_next
    n_rows = w.shape[0]  # every tile row holds the same x: the row sums are n_rows times one
    rstd1 = 1.0 / tl.sqrt(tl.sum(tl.sum(s_oo, 1), 0) / n_rows / K + eps1)
    sq = tl.sum(tl.sum(s_rr + 2.0 * rstd1 * s_ru + rstd1 * rstd1 * s_uu, 1), 0) / n_rows
    rstd2 = 1.0 / tl.sqrt(sq / K + eps2)
    c = tl.program_id(0)
    if c * BLOCK_K < K:
        offs = c * BLOCK_K + offs_k
        mk = offs < K
        o1 = tl.load(O + offs, mask=mk, other=0.0).to(tl.float32)
        r1 = tl.load(Res + offs, mask=mk, other=0.0).to(tl.float32)
        g11 = tl.load(G1 + offs, mask=mk, other=0.0)
        tl.store(Res_out + offs, (r1 + rstd1 * g11 * o1).to(Res_out.dtype.element_ty), mask=mk)
    return rstd2 * (tl.sum(acc_r, 1) + rstd1 * tl.sum(acc_u, 1))


@triton.jit
def _project(X, W, rows, K, stride_wn, Res, G1, G2, Res_out, eps1, eps2,
             BLOCK_K: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr,
             PREFETCH: tl.constexpr, DEPTH: tl.constexpr = 1):
    """The pair's two sums: of x, or with NORM of the sandwich-normed x (stream_rows_normed)."""
    if NORM:
        acc = stream_rows_normed(X, Res, G1, G2, Res_out, W, rows, K, stride_wn, eps1, eps2, BLOCK_K, USE_PDL,
                                 EARLY, PREFETCH)
    else:
        acc = stream_rows(X, W, rows, K, stride_wn, BLOCK_K, USE_PDL, EARLY, PREFETCH, DEPTH)
    return acc


def _tiles(norm, block_k, num_warps) -> tuple[int, int]:
    tiles = NORM_TILES if norm is not None else TILES
    return block_k or tiles["block_k"], num_warps or tiles["num_warps"]


def _norm_args(x: torch.Tensor, k: int, programs: int, block_k: int, norm) -> tuple:
    """(kernel args Res, G1, G2, Res_out, eps1, eps2; the new residual or None) for norm =
    (residual [1, K], g1 fp32 [K], g2 fp32 [K], eps1, eps2) or None."""
    if norm is None:
        return (x, x, x, x, 0.0, 0.0), None
    residual, g1, g2, eps1, eps2 = norm
    if residual.shape != (1, k) or residual.stride(-1) != 1 or residual.dtype != x.dtype:
        raise ValueError(f"gemv_pairs: residual {residual.dtype} {tuple(residual.shape)} does not match x")
    for g in (g1, g2):
        if g.shape != (k,) or g.dtype != torch.float32 or g.stride(-1) != 1:
            raise ValueError(f"gemv_pairs: norm weights must be fp32 [{k}], got {g.dtype} {tuple(g.shape)}")
    if programs < triton.cdiv(k, block_k):
        raise ValueError(f"gemv_pairs: {programs} programs cannot write {triton.cdiv(k, block_k)} residual chunks")
    new_residual = torch.empty_like(residual)
    return (residual, g1, g2, new_residual, float(eps1), float(eps2)), new_residual


@triton.jit
def _gemv_rope_kernel(
    X, W, Out, Cos, Sin, K_Buf, V_Buf, Loc, K, stride_wn,
    stride_buf_kt, stride_buf_kh, stride_buf_vt, stride_buf_vh,
    Res, G1, G2, Res_out, eps1, eps2,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr, NORM: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,  # gemv.prefetch_lines()
    DEPTH: tl.constexpr = 1,  # gemv.depth()
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // HALF
    j = pid % HALF
    r = tl.arange(0, 2)  # the pair: dims j and j + HALF of the head
    rows = (head * HEAD_DIM + j + r * HALF).to(tl.int64)
    acc = _project(X, W, rows, K, stride_wn, Res, G1, G2, Res_out, eps1, eps2, BLOCK_K, NORM, USE_PDL,
                   EARLY, PREFETCH, DEPTH)  # waits for x inside
    y = acc.to(Out.dtype.element_ty).to(tl.float32)  # the projection's output, as rotary reads it
    x1 = tl.sum(tl.where(r == 0, y, 0.0), 0)
    x2 = tl.sum(tl.where(r == 1, y, 0.0), 0)
    cos = tl.load(Cos + j)
    sin = tl.load(Sin + j)
    rotated = tl.where(r == 0, x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    is_v = head >= NUM_Q_HEADS + NUM_KV_HEADS
    out = tl.where(is_v, y, rotated).to(Out.dtype.element_ty)
    tl.store(Out + rows, out)
    if head >= NUM_Q_HEADS:
        slot = tl.load(Loc).to(tl.int64)
        dims = j + r * HALF
        if is_v:
            dst = V_Buf + slot * stride_buf_vt + (head - NUM_Q_HEADS - NUM_KV_HEADS) * stride_buf_vh + dims
            tl.store(dst, out.to(V_Buf.dtype.element_ty))
        else:
            dst = K_Buf + slot * stride_buf_kt + (head - NUM_Q_HEADS) * stride_buf_kh + dims
            tl.store(dst, out.to(K_Buf.dtype.element_ty))


def gemv_rope(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [(H + 2 KH) * D, K], rows contiguous
    cos: torch.Tensor,  # [1, D / 2] fp32
    sin: torch.Tensor,  # [1, D / 2] fp32
    k_buffer: torch.Tensor,  # [num_slots, KH, D]
    v_buffer: torch.Tensor,
    loc: torch.Tensor,  # [1] int slot of the token
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_k: int | None = None,  # TILES / NORM_TILES
    num_warps: int | None = None,
    early: bool = True,
    norm: tuple | None = None,
):
    """-> [1, N] in x's dtype: q and k rotated, v as projected; k and v also stored at loc.
    early: decode attention (a PDL launch) launches once this kernel's programs have waited.
    norm = (residual [1, K], g1, g2 fp32 [K], eps1, eps2): x is a sublayer's raw output and the
    projection takes norm2(residual + norm1(x)) (stream_rows_normed); returns (out, the new
    residual stream) then."""
    n, k = weight.shape
    half = head_dim // 2
    block_k, num_warps = _tiles(norm, block_k, num_warps)
    if x.shape != (1, k) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv_rope: x {tuple(x.shape)}, weight {tuple(weight.shape)} (need [1, K], [N, K])")
    if head_dim % 2 or n != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"gemv_rope: {n} rows are not {num_heads} + 2 x {num_kv_heads} heads of {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (1, half) or t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"gemv_rope: {name} must be fp32 [1, {half}], got {t.dtype} {tuple(t.shape)}")
    for buf in (k_buffer, v_buffer):
        if buf.shape[1:] != (num_kv_heads, head_dim) or buf.stride(-1) != 1 or buf.dtype != x.dtype:
            raise ValueError(f"gemv_rope: pool buffer {buf.dtype} {tuple(buf.shape)} does not take "
                             f"{num_kv_heads} x {head_dim} {x.dtype} rows")
    if loc.shape != (1,):
        raise ValueError(f"gemv_rope: loc has shape {tuple(loc.shape)}, expected (1,)")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    norm_args, new_residual = _norm_args(x, k, n // 2, block_k, norm)
    _gemv_rope_kernel[(n // 2,)](
        x, weight, out, cos, sin, k_buffer, v_buffer, loc, k, weight.stride(0),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1), *norm_args,
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_K=block_k,
        NORM=norm is not None, PREFETCH=prefetch_lines(x, k, block_k),
        DEPTH=1 if norm is not None else depth(k, block_k),
        num_warps=num_warps if x.is_cuda else 1, num_stages=1, **pdl_options(x), **chain_options(x, early),
    )
    return out if norm is None else (out, new_residual)


@triton.jit
def _gemv_glu_kernel(
    X, W, Out, K, stride_wn, I,
    Res, G1, G2, Res_out, eps1, eps2,
    BLOCK_K: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,  # gemv.prefetch_lines()
    DEPTH: tl.constexpr = 1,  # gemv.depth()
):
    j = tl.program_id(0)
    r = tl.arange(0, 2)  # the pair: gate row j and up row I + j
    rows = (j + r * I).to(tl.int64)
    acc = _project(X, W, rows, K, stride_wn, Res, G1, G2, Res_out, eps1, eps2, BLOCK_K, NORM, USE_PDL,
                   EARLY, PREFETCH, DEPTH)  # waits for x inside
    y = acc.to(Out.dtype.element_ty).to(tl.float32)  # the projection's output, as the activation reads it
    gate = tl.sum(tl.where(r == 0, y, 0.0), 0)
    up = tl.sum(tl.where(r == 1, y, 0.0), 0)
    tl.store(Out + j, act_and_mul(gate, up, Out, GELU))


def gemv_glu(x: torch.Tensor, weight: torch.Tensor, *, gelu: bool, block_k: int | None = None,
             num_warps: int | None = None, early: bool = True, norm: tuple | None = None):
    """x [1, K], weight [2I, K] (gate rows then up rows, contiguous) -> act(gate) * up [1, I] in
    x's dtype (act: gelu_pytorch_tanh when gelu, else silu). early: the next kernel (a PDL launch)
    launches once this kernel's programs have waited. norm: as gemv_rope's (returns (out, the
    new residual stream) then)."""
    n, k = weight.shape
    block_k, num_warps = _tiles(norm, block_k, num_warps)
    if x.shape != (1, k) or x.stride(-1) != 1 or weight.stride(-1) != 1 or n % 2:
        raise ValueError(f"gemv_glu: x {tuple(x.shape)}, weight {tuple(weight.shape)} (need [1, K], [2I, K])")
    out = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
    norm_args, new_residual = _norm_args(x, k, n // 2, block_k, norm)
    _gemv_glu_kernel[(n // 2,)](
        x, weight, out, k, weight.stride(0), n // 2, *norm_args, BLOCK_K=block_k, GELU=gelu,
        NORM=norm is not None, PREFETCH=prefetch_lines(x, k, block_k),
        DEPTH=1 if norm is not None else depth(k, block_k),
        num_warps=num_warps if x.is_cuda else 1, num_stages=1, **pdl_options(x), **chain_options(x, early),
    )
    return out if norm is None else (out, new_residual)
