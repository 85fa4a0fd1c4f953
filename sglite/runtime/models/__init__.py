"""Native torch models. One class covers the Llama family (Llama, SmolLM2, Qwen2/3, Mistral)."""

from sglite.runtime.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
