"""The Llama family as one native torch model, configured by ModelConfig flags:
GQA/MQA (num_kv_heads), Qwen2 q/k/v bias (attention_bias), Qwen3 q/k head norms (qk_norm),
tied embeddings, CLA (layers that do not produce KV have no k/v projections), and per-layer
sliding window + global tokens, both handed to the attention backend through AttentionLayer.

Parameter names follow the HF checkpoints, except q/k/v and gate/up, which are fused on load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.executor.attention.base import (
    AttentionLayer,
    BaseAttentionBackend,
    ForwardBatch,
    pad_logit_rows,
)
from sglite.runtime.executor.transfer import tensor_async
from sglite.runtime.models.config import ModelConfig
from sglite.runtime.models.layers import GatedMLP, MergedLinear, RMSNorm, rotate_qk
from sglite.runtime.models.layers.rotary import rotary_from_config

# checkpoint projection -> (fused module, shard name)
_PACKED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate_proj"), "up_proj": ("gate_up_proj", "up_proj"),
}
_PACKED_RE = re.compile(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
# checkpoints that store the projections fused already (Phi-3): loaded whole
_FUSED_RE = re.compile(r"(.*\.(?:qkv_proj|gate_up_proj))\.(weight|bias)$")


class LlamaAttention(nn.Module):
    norm_cls: type[nn.Module] = RMSNorm  # of the q/k head norms (qk_norm)

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.produces_kv = config.produces_kv(layer_id)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shards = {"q": q_size, "k": kv_size, "v": kv_size} if self.produces_kv else {"q": q_size}
        self.qkv_proj = MergedLinear(config.hidden_size, shards, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = self.norm_cls(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.norm_cls(self.head_dim, config.rms_norm_eps) if self.produces_kv else None
        self.qk_norm = config.qk_norm
        self.attn = AttentionLayer(
            layer_id=layer_id,
            kv_layer_id=config.kv_layer_id(layer_id),
            produces_kv=self.produces_kv,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            scale=config.attention_scale,
            sliding_window=config.window_for_layer(layer_id),
            global_tokens=config.global_tokens,
            logit_softcap=config.attn_logit_softcapping,
        )

    def forward(self, x, cos, sin, batch: ForwardBatch, backend: BaseAttentionBackend):
        num_tokens = x.shape[0]
        q, *kv = self.qkv_proj(x)  # views of one [T, q + 2 kv] output
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = v = None
        if self.produces_kv:
            k = kv[0].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            v = kv[1].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k) if k is not None else None
        # CUDA: in place on the projection output, K/V stored into the pool in the same launch
        dest = backend.kv_destination(self.attn, batch) if k is not None else None
        q, k, stored = rotate_qk(q, k, cos, sin, v=v, kv_destination=dest)
        o = backend.forward(q, k, v, self.attn, batch, kv_stored=stored)  # [T, H, D] contiguous
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.make_mlp(config, layer_id)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        """The feed-forward sublayer; families with other MLPs (MoE) override this."""
        return GatedMLP(config.hidden_size, config.intermediate_size, act=config.hidden_act)

    def forward(self, x, residual, cos, sin, batch, backend):
        """Fused-residual form: x is the previous sublayer's output, not yet added to the
        residual stream (residual None before the first layer); each norm adds it first."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, batch, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer  # what a family subclass swaps

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_cls)
        self.rotary = rotary_from_config(config)
        # tied: logits reuse embed_tokens.weight, so no second parameter can drift from it
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def attention_layers(self) -> list[AttentionLayer]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, batch: ForwardBatch, backend: BaseAttentionBackend) -> torch.Tensor:
        """Logits float32: [bs, vocab] (last new token of each request), [num_tokens, vocab]
        (return_all_logits) or [num_logit_rows, vocab] (the batch's logit_rows; padding cut off)."""
        x = self.model.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = self.rotary(batch.positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, batch, backend)
        rows, num_rows = logit_rows(batch, x.device)
        if rows is not None:  # the LM head runs on the rows whose logits are wanted only
            x = x[rows]
            residual = residual[rows] if residual is not None else None
        x = self.model.norm(x) if residual is None else self.model.norm(x, residual)[0]
        return F.linear(x, self.lm_head_weight)[:num_rows].float()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # --- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            match = _PACKED_RE.match(name)
            if match:
                prefix, proj, kind = match.groups()
                module_name, shard = _PACKED[proj]
                module = self.get_submodule(f"{prefix}.{module_name}")
                if shard not in module.shard_sizes:  # CLA layer: checkpoint has K/V we never use
                    raise ValueError(f"weight {name} belongs to a layer that produces no KV")
                module.load_shard(shard, kind, tensor)
                loaded.add(f"{prefix}.{module_name}.{kind}:{shard}")
                continue
            fused = _FUSED_RE.match(name)
            if fused and isinstance(module := modules.get(fused.group(1)), MergedLinear):
                module_name, kind = fused.groups()
                if tuple(tensor.shape) != tuple(getattr(module, kind).shape):
                    raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)} != model "
                                     f"{tuple(getattr(module, kind).shape)}")
                getattr(module, kind).data.copy_(tensor)
                loaded.update(f"{module_name}.{kind}:{shard}" for shard in module.shard_sizes)
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"weight {name}: checkpoint shape {tuple(tensor.shape)} != model "
                    f"{tuple(params[name].shape)}"
                )
            param = params[name]
            # adopt the loaded tensor: copying into the fresh buffer would touch every page twice
            param.data = tensor.to(device=param.device, dtype=param.dtype)
            loaded.add(name)
        missing = [n for n in self._expected_weight_keys() if n not in loaded]
        if missing == ["lm_head.weight"]:
            raise ValueError("checkpoint has no lm_head.weight but config.json says "
                             "tie_word_embeddings: false; if the head is the embedding (tied), set "
                             "\"tie_word_embeddings\": true in config.json")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def _expected_weight_keys(self) -> list[str]:
        keys = []
        for name, param in self.named_parameters():
            module_name, kind = name.rsplit(".", 1)
            module = self.get_submodule(module_name)
            if isinstance(module, MergedLinear):
                keys += [f"{module_name}.{kind}:{shard}" for shard in module.shard_sizes]
            else:
                keys.append(name)
        return keys

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for benchmarks: N(0, 0.02) keeps activations in a sane range."""
        gens: dict[torch.device, torch.Generator] = {}
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.data.fill_(1.0)
            elif name.endswith(".bias"):
                param.data.zero_()
            else:
                if param.device not in gens:
                    gens[param.device] = torch.Generator(param.device).manual_seed(seed)
                param.data.normal_(0, 0.02, generator=gens[param.device])


def logit_rows(batch: ForwardBatch, device) -> tuple[torch.Tensor | None, int | None]:
    """The packed rows the LM head runs on (None: every row; a decode's tokens are all last) and
    how many of them are real (the rest pad the count on CUDA: base.pad_logit_rows): the batch's
    logit_rows, or else each extended request's last new token."""
    if batch.logit_rows is not None:
        return batch.logit_rows, batch.num_logit_rows
    if batch.return_all_logits or batch.is_decode:
        return None, None
    ends, total = [], 0
    for n in batch.extend_lens_cpu:
        total += n
        ends.append(total - 1)
    # a pageable copy would wait for the GPU
    return tensor_async(pad_logit_rows(ends, device), torch.int64, device), len(ends)
