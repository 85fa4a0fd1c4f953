"""The paired-row GEMVs (sglite.kernels.gemv_pairs) compiled on the GPU at Gemma-2-9B's shapes,
on fresh random bf16 inputs, against the launches they replace and float64 references:
gemv_rope vs the one-row GEMV then the rotary kernel with its KV store (elements that differ, in
bf16 ulps), gemv_glu vs the GEMV then the GeGLU kernel, and with the norm prologue vs float64
(projection of norm2(residual + norm1(x)); the new residual).

    python bench/gemv_pairs_check.py          # a CUDA GPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglite.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref
from sglite.kernels.gemv import gemv
from sglite.kernels.gemv_pairs import gemv_glu, gemv_rope
from sglite.kernels.rotary import apply_rotary_qk, apply_rotary_ref

H, KH, D, HIDDEN, INTER = 16, 8, 256, 3584, 14336


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ulps(a, b) -> tuple[int, float]:
    """(elements that differ, the largest difference in units of b's bf16 spacing)."""
    diff = (a.float() - b.float()).abs()
    spacing = torch.where(b == 0, torch.ones_like(b.float()) * 2**-133,
                          b.float().abs() * 2**-7).clamp_min(2**-133)  # bf16: 8 significant bits
    return int((diff > 0).sum()), (diff / spacing).max().item()


def sandwich(o, res, g1, g2, eps):
    def norm(v, g):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g
    new_res = res.double() + norm(o.double(), g1.double())
    return norm(new_res, g2.double()), new_res


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(1, HIDDEN, device=dev).bfloat16()
    w_qkv = (torch.randn((H + 2 * KH) * D, HIDDEN, device=dev) * HIDDEN**-0.5).bfloat16()
    w_gu = (torch.randn(2 * INTER, HIDDEN, device=dev) * HIDDEN**-0.5).bfloat16()
    ang = torch.rand(1, D // 2, device=dev) * 100
    cos, sin = ang.cos(), ang.sin()
    loc = torch.tensor([5], device=dev)
    pools = [torch.full((8, KH, D), float("nan"), device=dev, dtype=torch.bfloat16) for _ in range(4)]
    out = gemv_rope(x, w_qkv, cos, sin, pools[0], pools[1], loc, num_heads=H, num_kv_heads=KH, head_dim=D)
    two = gemv(x, w_qkv)
    q2, k2, v2 = two.split([H * D, KH * D, KH * D], -1)
    apply_rotary_qk(q2.view(1, H, D), k2.view(1, KH, D), cos, sin, v=v2.view(1, KH, D), k_buffer=pools[2],
                    v_buffer=pools[3], loc=loc)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    n, u = ulps(out, two)
    print(f"gemv_rope vs gemv + rotary: {n} of {out.numel()} elements differ, at most {u:.2f} bf16 ulp; "
          f"pool rows: K {ulps(pools[0][5], pools[2][5])}, V equal {torch.equal(pools[1][5], pools[3][5])}; "
          f"untouched slots still NaN: {bool(torch.isnan(pools[0][:5]).all() and torch.isnan(pools[1][6:]).all())}")
    ref = F.linear(x.double(), w_qkv.double())[0]
    q, k, v = ref.split([H * D, KH * D, KH * D])
    ref = torch.cat([apply_rotary_ref(q.view(1, H, D), cos.double(), sin.double()).reshape(-1),
                     apply_rotary_ref(k.view(1, KH, D), cos.double(), sin.double()).reshape(-1), v])
    print(f"gemv_rope vs float64: rel err {rel(out[0], ref):.2e} (gemv + rotary {rel(two[0], ref):.2e})")
    glu = gemv_glu(x, w_gu, gelu=True)
    glu2 = gelu_tanh_and_mul(gemv(x, w_gu))
    print(f"gemv_glu vs gemv + GeGLU: bit-equal {torch.equal(glu, glu2)} {ulps(glu, glu2)}; vs float64 rel err "
          f"{rel(glu, gelu_tanh_and_mul_ref(F.linear(x.double(), w_gu.double()))):.2e}")
    for trial in range(2):  # fresh inputs each
        o = (torch.randn(1, HIDDEN, device=dev) * 4).bfloat16()
        res = (torch.randn(1, HIDDEN, device=dev) * 20).bfloat16()
        g1, g2 = 1 + 0.3 * torch.randn(HIDDEN, device=dev), 1 + 0.3 * torch.randn(HIDDEN, device=dev)
        normed, ref_res = sandwich(o, res, g1, g2, 1e-6)
        out, new_res = gemv_rope(o, w_qkv, cos, sin, pools[0], pools[1], loc, num_heads=H, num_kv_heads=KH,
                                 head_dim=D, norm=(res, g1, g2, 1e-6, 1e-6))
        p = F.linear(normed, w_qkv.double())[0]
        q, k, v = p.split([H * D, KH * D, KH * D])
        ref = torch.cat([apply_rotary_ref(q.view(1, H, D), cos.double(), sin.double()).reshape(-1),
                         apply_rotary_ref(k.view(1, KH, D), cos.double(), sin.double()).reshape(-1), v])
        glu, res2 = gemv_glu(o, w_gu, gelu=True, norm=(res, g1, g2, 1e-6, 1e-6))
        ref_glu = gelu_tanh_and_mul_ref(F.linear(normed, w_gu.double()))
        # what the unfused bf16 path reaches: the norm pair rounded to bf16, then the GEMV
        unfused = gemv_glu(normed.bfloat16(), w_gu, gelu=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"norm prologue, trial {trial}: rope rel err {rel(out[0], ref):.2e}, glu {rel(glu, ref_glu):.2e} "
              f"(bf16 normed input then the GEMV: {rel(unfused, ref_glu):.2e}), new residual "
              f"{rel(new_res, ref_res):.2e} / {rel(res2, ref_res):.2e}, finite {bool(torch.isfinite(out).all() and torch.isfinite(glu).all())}")


if __name__ == "__main__":
    main()
