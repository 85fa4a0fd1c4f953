"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's q/k head norms, no bias, top-k routing
renormalised as norm_topk_prob says, no shared expert. All of it is config, read by ModelConfig."""

from __future__ import annotations

from sglite.runtime.models.mixtral import SparseMoeForCausalLM


class Qwen3MoeForCausalLM(SparseMoeForCausalLM):
    pass
