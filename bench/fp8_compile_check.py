"""Compile the FP8 kernels for Hopper (sm90) on a machine without a GPU, and print each one's
registers / spills (cuobjdump): catches what the interpreter lets through (issue 19's first H200
call failed compiling the FP8 decode kernel, 'Inconsistent return types', which interpreted fine).

Each launcher runs on CPU tensors with JITFunction.run replaced by a recorder; the recorded
arguments become an ASTSource with the JIT's 16-byte divisibility specializations, compiled by
triton.compile for GPUTarget("cuda", 90, 32) with the launcher's own num_warps / num_stages.

    .venv/bin/python bench/fp8_compile_check.py
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_RECORDED: list = []
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64", torch.int16: "i16", torch.float8_e4m3fn: "fp8e4nv"}
_CUDA = torch.device("cuda")  # tile tables for the GPU, without one


def _record(self, *args, grid, warmup, **kwargs):
    _RECORDED.append((self, args, kwargs))


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if abs(v) < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return "tensordesc<%s%s>" % (_TYPES[v.base.dtype], list(v.block_shape))  # a TensorDescriptor


def _cuobjdump(kernel, flag: str) -> str:
    """cuobjdump's output for the kernel's cubin (the tool that ships with Triton's backend)."""
    from triton.backends.nvidia import compiler as nvc

    path = tempfile.mktemp(suffix=".cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(nvc.__file__), "bin", "cuobjdump")
    out = subprocess.run([tool, flag, path], capture_output=True, text=True).stdout
    os.unlink(path)
    return out


def _usage(kernel) -> str:
    out = _cuobjdump(kernel, "--dump-resource-usage")
    return " ".join(word for line in out.splitlines() if "REG" in line for word in line.split()[:2])


def _mma(kernel) -> str:
    """The matrix instructions in the kernel's SASS (HMMA / QGMMA / HGMMA kinds and counts)."""
    out = _cuobjdump(kernel, "-sass")
    kinds: dict[str, int] = {}
    for line in out.splitlines():
        for word in line.replace(";", " ").split():
            if word.split(".")[0] in ("HMMA", "QGMMA", "HGMMA", "IMMA"):
                kinds[word] = kinds.get(word, 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(kinds.items()))


def compile_recorded(label: str) -> None:
    for fn, args, kwargs in _RECORDED:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in ("num_warps", "num_stages")}
        bound = {**dict(zip(fn.arg_names, args)), **kwargs}
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = bound.get(p.name, p.default)
            if p.is_constexpr:
                signature[p.name], constexprs[(i,)] = "constexpr", v
                continue
            signature[p.name] = _type(v)
            if (isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0) or (
                    type(v) is int and v % 16 == 0 and not p.do_not_specialize):
                attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=options)
        print(f"{label:<40} {fn.__name__:<24} {_usage(kernel)} {_mma(kernel)}", flush=True)
    _RECORDED.clear()


def main():
    JITFunction.run = _record
    from sglite.kernels import decode_attention as da
    from sglite.kernels import extend_attention as ea
    from sglite.kernels import fp8_gemm, store_kv

    da._tma_device = lambda device: True  # the Hopper path: TMA descriptors
    heads, kv_heads, dim = 32, 8, 128
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    for kv in (torch.bfloat16, torch.float8_e4m3fn):
        k_buf, v_buf = torch.zeros(4096, kv_heads, dim).to(kv), torch.zeros(4096, kv_heads, dim).to(kv)
        for splits in (1, 4):
            q = torch.zeros(2, heads, dim, dtype=torch.bfloat16)
            da.decode_attention_fwd(q, k_buf, v_buf, torch.empty_like(q), torch.zeros(2, 1024, dtype=torch.int32),
                                    torch.arange(2), i32(512, 512), scale=0.1, num_splits=splits, page_size=128,
                                    tiles=da.decode_tiles(dim, device=_CUDA, num_splits=splits, kv_fp8=kv == torch.float8_e4m3fn),
                                    k_scale=0.5)
            compile_recorded(f"decode {kv} splits {splits}")
            if kv == torch.float8_e4m3fn:  # q.K^T as an FP8 product (tiles["q_fp8"])
                tiles = {**da.decode_tiles(dim, device=_CUDA, num_splits=splits, kv_fp8=True), "q_fp8": True}
                da.decode_attention_fwd(q, k_buf, v_buf, torch.empty_like(q), torch.zeros(2, 1024, dtype=torch.int32),
                                        torch.arange(2), i32(512, 512), scale=0.1, num_splits=splits, page_size=128,
                                        tiles=tiles, k_scale=0.5)
                compile_recorded(f"decode fp8 q_fp8 splits {splits}")
        for from_pool in (False, True):
            q = torch.zeros(64, heads, dim, dtype=torch.bfloat16)
            new = None if from_pool else torch.zeros(64, kv_heads, dim, dtype=torch.bfloat16)
            ea.extend_attention_fwd(q, new, new, torch.empty_like(q), k_buf, v_buf, torch.zeros(2, 1024, dtype=torch.int32),
                                    torch.arange(2), i32(0, 10), i32(32, 32), i32(0, 32), max_extend_len=32,
                                    scale=0.1, out_cache_loc=torch.arange(64), k_scale=0.5,
                                    tiles=ea.extend_tiles(dim, 4, device=_CUDA))
            compile_recorded(f"extend {kv} new K/V from pool {from_pool}")
        new = torch.zeros(5, kv_heads, dim, dtype=torch.bfloat16)
        store_kv.store_kv(k_buf, v_buf, torch.arange(5), new, new, k_scale=0.5)
        compile_recorded(f"store_kv into {kv}")
    for m, n, k in ((1, 6144, 4096), (1, 28672, 4096), (16, 4096, 14336), (256, 3072, 576)):
        w = torch.zeros(n, k).to(torch.float8_e4m3fn)
        fp8_gemm.w8a16_matmul(torch.zeros(m, k, dtype=torch.bfloat16), w, torch.ones(n),
                              tiles=fp8_gemm.fp8_gemm_tiles(m, n, k, device=_CUDA))
        compile_recorded(f"w8a16 M={m} N={n} K={k}")
    # the one-row kernel's default (PDL-launched) tiles: on CPU tensors pdl_options gives nothing
    from sglite.kernels import fp8_gemv

    fp8_gemv.pdl_options = lambda t: dict(USE_PDL=True)  # launch_pdl is a launcher option, not compiled
    fp8_gemm.early_launch = lambda t: True
    for m, n, k in ((1, 6144, 4096), (1, 4096, 14336)):
        w = torch.zeros(n, k).to(torch.float8_e4m3fn)
        fp8_gemm.w8a16_matmul(torch.zeros(m, k, dtype=torch.bfloat16), w, torch.ones(n),
                              tiles=fp8_gemm.fp8_gemm_tiles(m, n, k, device=_CUDA))
        compile_recorded(f"w8a16 PDL M={m} N={n} K={k}")
    for m, n, k in ((4, 28672, 4096), (16, 4096, 14336)):  # the plain kernel letting dependents launch (EARLY)
        w = torch.zeros(n, k).to(torch.float8_e4m3fn)
        fp8_gemm.w8a16_matmul(torch.zeros(m, k, dtype=torch.bfloat16), w, torch.ones(n),
                              tiles=fp8_gemm.fp8_gemm_tiles(m, n, k, device=_CUDA))
        compile_recorded(f"w8a16 EARLY M={m} N={n} K={k}")
    # SmolLM2-135M (the accuracy run's model): head_dim 64, 9 query / 3 KV heads, FP8 pool
    k_buf = torch.zeros(4096, 3, 64).to(torch.float8_e4m3fn)
    for splits in (1, 4):
        q = torch.zeros(2, 9, 64, dtype=torch.bfloat16)
        da.decode_attention_fwd(q, k_buf, k_buf, torch.empty_like(q), torch.zeros(2, 1024, dtype=torch.int32),
                                torch.arange(2), i32(512, 512), scale=0.1, num_splits=splits, page_size=128,
                                tiles=da.decode_tiles(64, device=_CUDA, num_splits=splits, kv_fp8=True), k_scale=0.5)
        compile_recorded(f"decode fp8 d64 9/3 heads splits {splits}")
    fp8_gemm.scale_rows_cols(torch.zeros(256, 6144, dtype=torch.bfloat16), torch.ones(256, 1), torch.ones(6144))
    compile_recorded("scale_rows_cols")
    fp8_gemm.quantize_rows(torch.zeros(256, 4096, dtype=torch.bfloat16))
    compile_recorded("quantize_rows")


if __name__ == "__main__":
    main()
