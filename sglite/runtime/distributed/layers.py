"""Tensor-parallel sharding of an already-built (loaded) Llama-family model, in place.

Megatron's split, as SGLang and vLLM do it: q/k/v and gate/up are column-parallel (each rank keeps
its rows: its attention heads, its slice of the MLP), o_proj and down_proj row-parallel (the
matching input columns, then a sum over ranks), the embedding and the LM head vocab-parallel (each
rank holds a contiguous slice of the vocabulary, padded to a common size; lookups are summed over
ranks, logits gathered). Every rank ends with the same full hidden states and full logits.

Heads (head_shard): whole GQA groups per rank when there are at least as many KV heads as ranks
(as even as they go, so 9 heads / 3 KV heads run on 2 ranks), else each KV head replicated on the
ranks that split its query heads; a group never straddles ranks. The MLP splits as evenly as it
goes too. Ranks with fewer heads hold the same KV slots (ModelRunner agrees on the pool size).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.models.config import ModelConfig
from sglite.runtime.models.layers.linear import MergedLinear
from sglite.runtime.models.layers.mlp import GatedMLP
from sglite.runtime.models.layers.moe import SparseMoeBlock


class Collectives:
    """What the sharded layers need of a group (TPGroup, or a stand-in for world 1)."""

    rank: int
    world: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...
    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads [q_start, q_start + num_heads), KV heads
    [kv_start, kv_start + num_kv_heads) of the full model."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world: int) -> HeadShard:
    """With at least as many KV heads as ranks, each rank takes whole GQA groups (a KV head and
    its query heads), as evenly as they go: 3 KV heads over 2 ranks give 2 and 1 (SmolLM2's 9
    heads: 6 and 3). With fewer, each KV head is replicated on world / num_kv_heads ranks, which
    split its group's query heads evenly."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        base, extra = divmod(num_kv_heads, world)
        kv_start, kv = rank * base + min(rank, extra), base + (rank < extra)
        return HeadShard(kv_start * group, kv * group, kv_start, kv)
    if world % num_kv_heads or num_heads % world:
        raise ValueError(f"tp size {world} over {num_kv_heads} KV heads must be a multiple of them "
                         f"and divide the {num_heads} attention heads")
    heads = num_heads // world
    return HeadShard(rank * heads, heads, rank // (world // num_kv_heads), 1)  # KV replicated


def shard_config(config: ModelConfig, rank: int, world: int) -> ModelConfig:
    """The config one rank's KV pool and attention backend see: its heads only."""
    s = head_shard(config.num_heads, config.num_kv_heads, rank, world)
    return dataclasses.replace(config, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads)


class RowParallel(nn.Module):
    """A linear whose input features are split over ranks (this rank's: [lo, hi)): its partial
    product, summed over ranks; the bias (if any) added once, after the sum."""

    def __init__(self, linear: nn.Module, cols: tuple[int, int], group: Collectives):
        super().__init__()
        lo, hi = cols
        self.weight = nn.Parameter(linear.weight.data[:, lo:hi].contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = hi - lo, linear.out_features
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(F.linear(x, self.weight).contiguous())
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding (the last rank's padded with zeros to the
    common size). `weight` is what a tied LM head multiplies by: local logits, gathered by the
    model's hook."""

    def __init__(self, embedding: nn.Embedding, group: Collectives):
        super().__init__()
        vocab = embedding.num_embeddings
        self.rows = -(-vocab // group.world)
        self.start = group.rank * self.rows
        self.weight = nn.Parameter(_vocab_rows(embedding.weight.data, self.start, self.rows),
                                   requires_grad=False)
        self.num_embeddings, self.group = vocab, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


def shard_model(model: nn.Module, group: Collectives) -> nn.Module:
    """Shard a loaded LlamaForCausalLM (or a family subclass with the same modules) for
    group.rank of group.world, in place; returns it. Its forward then returns the full logits on
    every rank."""
    cfg: ModelConfig = model.config
    _check_supported(model)
    world, rank = group.world, group.rank
    shard = head_shard(cfg.num_heads, cfg.num_kv_heads, rank, world)
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, shard, group)
        if isinstance(layer.mlp, GatedMLP):
            mlp = layer.mlp
            lo, hi = _split(mlp.gate_up_proj.shard_sizes["gate_proj"], group)
            _keep_rows(mlp.gate_up_proj, {"gate_proj": (lo, hi), "up_proj": (lo, hi)})
            mlp.down_proj = RowParallel(mlp.down_proj, (lo, hi), group)
        else:
            layer.mlp = _shard_moe(layer.mlp, group)
    embed = VocabParallelEmbedding(model.model.embed_tokens, group)
    model.model.embed_tokens = embed
    if model.lm_head is not None:
        model.lm_head.weight = nn.Parameter(_vocab_rows(model.lm_head.weight.data, embed.start, embed.rows),
                                            requires_grad=False)
    model.register_forward_hook(_LogitsGather(group, cfg.vocab_size))
    model.tp_group = group
    return model


class _LogitsGather:
    """Forward hook: local vocab-slice logits -> the full vocabulary, padding dropped."""

    def __init__(self, group: Collectives, vocab: int):
        self.group, self.vocab = group, vocab

    def __call__(self, module, args, logits: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last(logits)[..., : self.vocab]


class ReducedSum(nn.Module):
    """A block whose output is a sum of per-rank partial outputs: summed over ranks."""

    def __init__(self, block: nn.Module, group: Collectives):
        super().__init__()
        self.block, self.group = block, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.block(x).contiguous())


def _shard_moe(block: nn.Module, group: Collectives) -> nn.Module:
    """MoE as SGLang's moe tensor parallelism: every rank routes every token to every expert it
    picks and keeps a slice of each expert's intermediate (w13's gate and up rows, w2's columns);
    the shared expert (Qwen2-MoE) is sliced the same way and the router replicated, so the block's
    output (routed + sigmoid(gate(x)) * shared) is linear in the slices: one all-reduce."""
    experts = block.experts
    inter = experts.w2_weight.shape[2]
    lo, hi = _split(inter, group)
    w13 = experts.w13_weight.data
    experts.w13_weight = nn.Parameter(torch.cat([w13[:, lo:hi], w13[:, inter + lo : inter + hi]], 1)
                                      .contiguous(), requires_grad=False)
    experts.w2_weight = nn.Parameter(experts.w2_weight.data[:, :, lo:hi].contiguous(), requires_grad=False)
    shared = block.shared_expert
    if shared is not None:
        slo, shi = _split(shared.gate_up_proj.shard_sizes["gate_proj"], group)
        _keep_rows(shared.gate_up_proj, {"gate_proj": (slo, shi), "up_proj": (slo, shi)})
        down = shared.down_proj
        down.weight = nn.Parameter(down.weight.data[:, slo:shi].contiguous(), requires_grad=False)
        down.in_features = shi - slo
    return ReducedSum(block, group)


def _shard_attention(attn: nn.Module, s: HeadShard, group: Collectives) -> None:
    d = attn.head_dim
    rows = {"q": (s.q_start * d, (s.q_start + s.num_heads) * d)}
    if attn.produces_kv:
        rows["k"] = rows["v"] = (s.kv_start * d, (s.kv_start + s.num_kv_heads) * d)
    _keep_rows(attn.qkv_proj, rows)
    attn.o_proj = RowParallel(attn.o_proj, rows["q"], group)  # its inputs are the query heads
    attn.num_heads, attn.num_kv_heads = s.num_heads, s.num_kv_heads
    attn.attn = dataclasses.replace(attn.attn, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads)


def _keep_rows(linear: MergedLinear, rows: dict[str, tuple[int, int]]) -> None:
    """Keep rows [lo, hi) of each named shard of a fused linear (weight and bias)."""
    if getattr(linear, "quant_method", None) is not None:
        raise NotImplementedError("tensor parallelism over quantized linears is not supported yet")
    pieces = {name: (linear.shard_offsets[name] + lo, linear.shard_offsets[name] + hi)
              for name, (lo, hi) in rows.items()}
    for kind in ("weight", "bias"):
        param = getattr(linear, kind)
        if param is not None:
            kept = torch.cat([param.data[a:b] for a, b in pieces.values()]).contiguous()
            setattr(linear, kind, nn.Parameter(kept, requires_grad=False))
    linear.shard_sizes = {name: b - a for name, (a, b) in pieces.items()}
    offset, linear.shard_offsets = 0, {}
    for name, size in linear.shard_sizes.items():
        linear.shard_offsets[name] = offset
        offset += size
    linear.out_features = offset


def _split(n: int, group: Collectives) -> tuple[int, int]:
    """Rank's part [lo, hi) of n, the first n % world ranks one longer."""
    base, extra = divmod(n, group.world)
    lo = group.rank * base + min(group.rank, extra)
    return lo, lo + base + (group.rank < extra)


def _vocab_rows(weight: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    out = weight.new_zeros(rows, weight.shape[1])
    kept = weight[start : start + rows]
    out[: len(kept)] = kept
    return out


def _check_supported(model: nn.Module) -> None:
    for layer in model.model.layers:
        if not isinstance(layer.mlp, (GatedMLP, SparseMoeBlock)):
            raise NotImplementedError(f"tensor parallelism: {type(layer.mlp).__name__} layers "
                                      "are not split yet")
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is not None:
            raise NotImplementedError(f"tensor parallelism over quantized layers ({name}) is not "
                                      "supported yet")
