"""Phi-3 / 3.5 / 4 (Phi3ForCausalLM) on the Llama layers.

The checkpoints store q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (gate first):
the very layout of the fused MergedLinear modules, so those tensors load whole
(LlamaForCausalLM.load_weights). RoPE: `longrope` / `su` scaling (short factors within
original_max_position_embeddings, long ones beyond, cos/sin scaled by the attention factor) and,
for Phi-4-mini, partial_rotary_factor; see layers/rotary.py. A config's sliding_window (Phi-3-mini
4k: 2047) applies to every layer, as transformers applies it.
"""

from __future__ import annotations

from sglite.runtime.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
