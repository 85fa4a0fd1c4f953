"""Mixture-of-Experts layers: the top-k router, the experts as two stacked weights, and the sparse
block of Mixtral / Qwen2-MoE / Qwen3-MoE, numerically matched to transformers' blocks.

Router: softmax over all experts in fp32, top-k, then (Mixtral always, Qwen as `norm_topk_prob`
says) renormalised to sum to 1; the weights are cast to the activation dtype, as transformers
does. Where the Triton experts run, the router is one launch too (fused_moe.route). Experts run as sglite.kernels.fused_moe's Triton kernel on CUDA and under TRITON_INTERPRET
(the CPU tests), else as its torch reference loop (the CPU executor).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.models.layers.fused import use_fused
from sglite.runtime.models.layers.mlp import GatedMLP


def select_experts(router_logits: torch.Tensor, top_k: int, *, renormalize: bool):
    """router_logits [T, E] -> (weights fp32 [T, k], expert ids int64 [T, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# SGLITE_MOE_ROUTE=torch: the router as torch ops (softmax, topk, renorm, cast) on CUDA too
ROUTE_KERNEL = os.environ.get("SGLITE_MOE_ROUTE", "kernel") != "torch"


def use_triton_moe(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return use_fused(x)  # SGLITE_FUSED_KERNELS=0: the torch loop, the before of benchmarks
    return os.environ.get("TRITON_INTERPRET") == "1"


class FusedExperts(nn.Module):
    """E gated MLPs as w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, topk_weights, topk_ids):
        """x [T, H], topk_weights [T, k] in x's dtype, topk_ids [T, k] -> [T, H]."""
        from sglite.kernels import fused_moe as kernels

        run = kernels.fused_moe if use_triton_moe(x) else kernels.fused_moe_reference
        return run(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's shared expert, scaled by sigmoid(gate(x)))."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedExperts(config.num_experts, config.hidden_size,
                                    config.moe_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if use_triton_moe(x) and ROUTE_KERNEL:  # one launch for softmax, top-k, renorm, cast
            from sglite.kernels.fused_moe import route

            weights, ids = route(logits, self.top_k, renormalize=self.renormalize, dtype=x.dtype)
        else:
            weights, ids = select_experts(logits, self.top_k, renormalize=self.renormalize)
            weights = weights.to(x.dtype)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


_EXPERT_RE = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def stack_expert_weights(weights: Iterable[tuple[str, torch.Tensor]], num_experts: int
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names `<p>.experts.<e>.{gate,up,down}_proj.weight` -> `<p>.experts.w13_weight`
    [E, 2I, H] and `<p>.experts.w2_weight` [E, H, I], each yielded once all E experts of it have
    arrived; every other weight passes through."""
    staged: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in weights:
        match = _EXPERT_RE.match(name)
        if not match:
            yield name, tensor
            continue
        prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
        if expert >= num_experts:
            raise ValueError(f"weight {name}: expert {expert} >= num_experts={num_experts}")
        parts = staged.setdefault(prefix, {})
        parts[(expert, proj)] = tensor
        if proj == "down_proj" and all((e, "down_proj") in parts for e in range(num_experts)):
            yield f"{prefix}.w2_weight", torch.stack([parts.pop((e, "down_proj"))
                                                      for e in range(num_experts)])
        elif proj != "down_proj" and all((e, p) in parts for e in range(num_experts)
                                         for p in ("gate_proj", "up_proj")):
            yield f"{prefix}.w13_weight", torch.stack([
                torch.cat([parts.pop((e, "gate_proj")), parts.pop((e, "up_proj"))])
                for e in range(num_experts)])
        if not parts:
            del staged[prefix]
    if staged:
        prefix, parts = next(iter(staged.items()))
        raise ValueError(f"checkpoint lacks expert weights of {prefix}: has only "
                         f"{sorted(parts)[:4]}...")
