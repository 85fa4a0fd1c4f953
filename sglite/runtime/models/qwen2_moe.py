"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v bias, top-k routing (renormalised only with
norm_topk_prob) plus a shared expert scaled by sigmoid(shared_expert_gate(x)); dense layers at
mlp_only_layers / off decoder_sparse_step. All of it is config, read by ModelConfig."""

from __future__ import annotations

from sglite.runtime.models.mixtral import SparseMoeForCausalLM


class Qwen2MoeForCausalLM(SparseMoeForCausalLM):
    pass
