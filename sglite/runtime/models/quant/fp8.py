"""FP8 (e4m3) weights: online per-output-channel quantization at load, FP8 checkpoints as
published, and the linear method that runs them.

Every quantized layer holds `weight` float8_e4m3fn [N, K] and `weight_scale` fp32 [N] (a buffer:
checkpoints name it, but it is no trainable parameter), y = x @ (weight * weight_scale[:, None]).T.
A checkpoint's per-tensor scales become per-channel vectors (each fused shard's scalar repeated
over its rows): the same numbers, one layout for the kernels. Activations get dynamic per-token
scales on the GPU (sglite.kernels.fp8_gemm); static `input_scale`s in a checkpoint are ignored.
On the CPU the layer dequantizes its weight and runs F.linear: the reference path CI tests.

Left in the checkpoint dtype: the embeddings, the LM head and MoE routers (small, and the
logits and routing are the most sensitive to rounding, as in vLLM), and any layer whose sizes are
not multiples of 16 (cuBLAS's FP8 GEMM needs them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.models.layers.linear import MergedLinear, QuantLinear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_SKIP = ("lm_head", "gate", "shared_expert_gate")  # logits and routers stay unquantized
# checkpoint projection -> (fused module, shard), as the models fuse them (llama.py's _PACKED)
_PACKED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate_proj"), "up_proj": ("gate_up_proj", "up_proj"),
}
_PACKED_RE = re.compile(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)$")


class Fp8LinearMethod:
    """The quant_method of an FP8 layer (sglite.runtime.models.layers.linear.linear_forward)."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # [M, K]
        if rows.is_cuda:
            from sglite.kernels.fp8_gemm import fp8_linear

            out = fp8_linear(rows, layer.weight, layer.weight_scale, layer.bias)
        else:  # the reference path: dequantize in the layer
            out = F.linear(rows, dequantize(layer.weight, layer.weight_scale, x.dtype), layer.bias)
        return out.view(*shape[:-1], out.shape[-1])

    def __repr__(self) -> str:
        return "fp8"


FP8_METHOD = Fp8LinearMethod()


SCALE_CANDIDATES = 16  # per-channel scales tried by quantize_per_channel (c = 1 + j / 16)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (fp8 [N, K], fp32 scales [N]): each row's scale the one of
    amax * c / 448, c in [1, 2) (SCALE_CANDIDATES steps), with the least squared rounding error.
    c = 1 (amax -> 448, the usual choice) is one candidate, so no row gets worse; the others slide
    the e4m3 grid under the row's values (a binade's relative spacing repeats every factor 2).
    SmolLM2-135M (weights from its Q4_1 GGUF): rms relative error 0.0263 -> 0.0245."""
    w = weight.float()
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    step = max(1, (1 << 24) // max(k, 1))  # rows at a time: bounded temporaries (64 MB of fp32 each)
    for r0 in range(0, n, step):
        rows = w[r0 : r0 + step]
        amax = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        best_err = best_s = best_q = None
        for j in range(SCALE_CANDIDATES):
            s = amax * (1.0 + j / SCALE_CANDIDATES)
            cand = (rows / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            err = (cand.float() * s - rows).square().sum(dim=1, keepdim=True)
            if best_err is None:
                best_err, best_s, best_q = err, s, cand
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_q = torch.where(better, cand.view(torch.uint8), best_q.view(torch.uint8)).view(FP8_DTYPE)
        q[r0 : r0 + step] = best_q
        scale[r0 : r0 + step] = best_s[:, 0]
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [N, K] and fp32 scales [N] -> [N, K] in dtype."""
    return (q.float() * scale[:, None]).to(dtype)


def quantize_model(model: nn.Module) -> list[str]:
    """Quantize every eligible linear layer of a loaded model in place; their names."""
    names = []
    for name, layer in _fp8_layers(model):
        _set_fp8(layer, *quantize_per_channel(layer.weight.data))
        names.append(name)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # hand the bf16 weights' memory back: the KV pool is sized from what the driver reports free
        # (H200, Llama-3-8B: the FP8 server's pool had 672k tokens vs bf16's 686k before this)
        torch.cuda.empty_cache()
    return names


def load_fp8(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], quant_config: dict) -> list[str]:
    """Load an FP8 checkpoint as published: fp8 weights kept as they are, their `weight_scale`
    (per-tensor or per-channel) expanded to per-channel vectors. A projection the checkpoint left
    unquantized is quantized here. Returns the FP8 layers' names."""
    if quant_config.get("weight_block_size") is not None:
        raise NotImplementedError("block-wise FP8 checkpoints (weight_block_size) are not supported")
    layers = dict(_fp8_layers(model))
    for layer in layers.values():  # fp8 storage for the checkpoint's bytes
        layer.weight = nn.Parameter(torch.empty_like(layer.weight, dtype=FP8_DTYPE), requires_grad=False)
    scales: dict[tuple[str, str | None], torch.Tensor] = {}
    model.load_weights(_split_scales(weights, layers, scales))
    for name, layer in layers.items():
        _set_fp8(layer, layer.weight.data, _channel_scales(name, layer, scales))
    return list(layers)


def _split_scales(weights, layers, scales) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors minus its scales (collected into `scales` by (layer, shard));
    weights of FP8 layers that come unquantized are quantized on the way."""
    for name, tensor in weights:
        prefix, _, kind = name.rpartition(".")
        if kind == "input_scale":
            continue  # static activation scales: activations are scaled per token instead
        if kind == "weight_scale_inv":
            raise NotImplementedError(f"{name}: block-wise FP8 scales are not supported")
        target = _target_of(prefix)
        if kind == "weight_scale":
            if target[0] not in layers:
                raise ValueError(f"{name}: a scale for a layer that is not quantized")
            scales[target] = tensor.float()
            continue
        if kind == "weight" and target[0] in layers and tensor.dtype != FP8_DTYPE:
            tensor, scales[target] = quantize_per_channel(tensor)
        yield name, tensor


def _channel_scales(name: str, layer: nn.Module, scales) -> torch.Tensor:
    shards = layer.shard_sizes if isinstance(layer, MergedLinear) else {None: layer.out_features}
    parts = []
    for shard, size in shards.items():
        scale = scales.get((name, shard))
        if scale is None:
            raise ValueError(f"FP8 checkpoint lacks the weight_scale of {name}{'.' + shard if shard else ''}")
        scale = scale.reshape(-1)
        if scale.numel() not in (1, size):
            raise ValueError(f"{name}: weight_scale of {scale.numel()} values for {size} channels")
        parts.append(scale.expand(size))
    return torch.cat(parts).to(device=layer.weight.device, dtype=torch.float32).contiguous()


def _target_of(prefix: str) -> tuple[str, str | None]:
    """Checkpoint module name -> (model module name, fused shard or None)."""
    match = _PACKED_RE.match(prefix)
    if match:
        module, shard = _PACKED[match.group(2)]
        return f"{match.group(1)}.{module}", shard
    return prefix, None


def _fp8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers FP8 applies to, after swapping each eligible nn.Linear for a QuantLinear."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _eligible(child_name, child):
                setattr(parent, child_name, QuantLinear(child))
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (MergedLinear, QuantLinear)) and _eligible(name.rpartition(".")[2], m)]


def _eligible(name: str, layer: nn.Module) -> bool:
    n, k = layer.weight.shape
    return name not in _SKIP and n % 16 == 0 and k % 16 == 0


def _set_fp8(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> None:
    layer.weight = nn.Parameter(q, requires_grad=False)
    if "weight_scale" in layer._buffers:
        layer.weight_scale = scale
    else:
        layer.register_buffer("weight_scale", scale)
    layer.quant_method = FP8_METHOD
