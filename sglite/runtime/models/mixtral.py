"""Mixtral: the Llama attention with a sparse MoE feed-forward in every layer (top-k renormalised).

Its checkpoints name the block `block_sparse_moe` and the expert projections w1 (gate), w3 (up)
and w2 (down); they are renamed on load to the names the shared MoE layer uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from sglite.runtime.models.config import ModelConfig
from sglite.runtime.models.layers.moe import SparseMoeBlock, stack_expert_weights
from sglite.runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM

_MIXTRAL_EXPERT_RE = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w([123])\.")
_MIXTRAL_PROJ = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


class SparseDecoderLayer(LlamaDecoderLayer):
    """A decoder layer whose MLP is the sparse MoE block where the config says so."""

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        if config.is_moe_layer(layer_id):
            return SparseMoeBlock(config)
        return super().make_mlp(config, layer_id)


class SparseMoeForCausalLM(LlamaForCausalLM):
    """Llama with sparse layers; expert weights are stacked per layer as they load."""

    layer_cls = SparseDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(self.rename_weights(weights),
                                                  self.config.num_experts))

    def rename_weights(self, weights):
        return weights


class MixtralForCausalLM(SparseMoeForCausalLM):
    def rename_weights(self, weights):
        for name, tensor in weights:
            name = _MIXTRAL_EXPERT_RE.sub(
                lambda m: f".mlp.experts.{m.group(1)}.{_MIXTRAL_PROJ[m.group(2)]}.", name)
            yield name.replace(".block_sparse_moe.", ".mlp."), tensor
