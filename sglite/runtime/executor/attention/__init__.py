"""Attention backends, chosen by name: "torch" (CPU and reference), "triton" (GPU), "auto"."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sglite.runtime.executor.attention.base import (
    AttentionLayer,
    BaseAttentionBackend,
    ForwardBatch,
    ForwardMode,
)

_BACKENDS: dict[str, Callable[..., BaseAttentionBackend]] = {}


def register(name: str):
    def deco(factory):
        _BACKENDS[name] = factory
        return factory

    return deco


@register("torch")
def _create_torch(*, kv_cache, model_config, device):
    from sglite.runtime.executor.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(kv_cache=kv_cache, model_config=model_config, device=device)


@register("triton")
def _create_triton(*, kv_cache, model_config, device):
    from sglite.runtime.executor.attention.triton_backend import TritonAttentionBackend  # lazy: needs triton

    return TritonAttentionBackend(kv_cache=kv_cache, model_config=model_config, device=device)


def create_attention_backend(name: str, *, kv_cache, model_config, device) -> BaseAttentionBackend:
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(_BACKENDS)}")
    return _BACKENDS[name](kv_cache=kv_cache, model_config=model_config, device=device)


__all__ = [
    "AttentionLayer",
    "BaseAttentionBackend",
    "ForwardBatch",
    "ForwardMode",
    "create_attention_backend",
    "register",
]
