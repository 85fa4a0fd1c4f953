"""Tensor-parallel sharding (sglite.runtime.distributed.layers) on gloo: two processes, each
shards the same tiny model for its rank, and the sharded forwards (an extend batch, a decode
batch over its KV) give the unsharded model's logits on every rank. Cases: KV heads split
(tiny: 4 heads, 2 KV heads), KV heads replicated (1 KV head for 2 ranks) with an untied LM head
and a vocabulary that does not divide by the ranks (padded slices), and uneven ranks (3 GQA
groups: 2 on rank 0, 1 on rank 1, as SmolLM2's 9 heads / 3 KV heads; an MLP of odd width), and a
Qwen2-MoE (each expert's intermediate split, the shared expert too, one dense layer)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from sglite.runtime.distributed.layers import head_shard

CASES = {
    "kv split, tied": {},
    "kv replicated, untied, odd vocab": dict(num_kv_heads=1, tie_word_embeddings=False, vocab_size=509),
    "uneven: 3 GQA groups, odd MLP": dict(num_heads=6, num_kv_heads=3, intermediate_size=130),
    "qwen2-moe: experts, shared expert, a dense layer, qkv bias": dict(
        architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
        moe_layers=(True, False, True, True), attention_bias=True, tie_word_embeddings=False),
}


def _forwards(runner, prompts):
    """Logits of one extend batch, then of one decode step of the same requests."""
    rows = list(range(len(prompts)))
    lens = [len(p) for p in prompts]
    slots = torch.arange(1, sum(lens) + 1, dtype=torch.int64)
    batch = runner.make_extend_batch(rows, [0] * len(rows), prompts, slots)
    extend = runner.forward(batch)
    nxt = extend.argmax(-1).tolist()
    dec_slots = torch.arange(sum(lens) + 1, sum(lens) + 1 + len(rows), dtype=torch.int64)
    decode, _ = runner.forward_decode(rows, [n + 1 for n in lens], nxt, dec_slots)
    return extend.clone(), decode.clone()


def _rank_main(rank, world, port):
    from sglite.runtime.distributed.group import TPGroup
    from sglite.runtime.distributed.layers import shard_config, shard_model
    from sglite.runtime.executor.attention import create_attention_backend
    from sglite.runtime.executor.model_runner import ModelRunner
    from sglite.runtime.mem.kv_cache import KVCache

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False)
    group = TPGroup(store, rank, world, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    for overrides in CASES.values():
        runner = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=256,
                             max_running_requests=4, config_overrides=overrides, attention_backend="torch")
        bias_gen = torch.Generator().manual_seed(9)  # dummy weights zero the biases
        for name, param in runner.model.named_parameters():
            if name.endswith(".bias"):
                param.data.normal_(0, 0.5, generator=bias_gen)
        vocab = runner.model_config.vocab_size
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 9, 2)]
        ref = _forwards(runner, prompts)
        shard_model(runner.model, group)
        local = shard_config(runner.model_config, rank, world)
        runner.kv_cache = KVCache.for_model(local, dtype=torch.float32, max_total_tokens=256)
        runner.attn_backend = create_attention_backend("torch", kv_cache=runner.kv_cache,
                                                       model_config=local, device="cpu")
        assert runner.kv_cache.num_kv_heads == local.num_kv_heads < 3
        assert sum(group.all_reduce(torch.tensor([local.num_heads]))) == runner.model.config.num_heads
        got = _forwards(runner, prompts)
        for want, have in zip(ref, got):
            assert have.shape == want.shape == (len(prompts), vocab)
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)
            assert have.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_sharded_forward_matches_unsharded_on_gloo():
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    tmp.spawn(_rank_main, args=(2, store.port), nprocs=2, join=True)


def test_head_shard_split_and_replicated():
    s = [head_shard(8, 4, r, 2) for r in range(2)]
    assert [(x.q_start, x.num_heads, x.kv_start, x.num_kv_heads) for x in s] == [(0, 4, 0, 2), (4, 4, 2, 2)]
    # 2 KV heads over 4 ranks: ranks 0, 1 read KV head 0, ranks 2, 3 KV head 1
    s = [head_shard(8, 2, r, 4) for r in range(4)]
    assert [(x.q_start, x.kv_start, x.num_kv_heads) for x in s] == [
        (0, 0, 1), (2, 0, 1), (4, 1, 1), (6, 1, 1)]
    # 3 GQA groups of 3 (SmolLM2-135M) over 2 ranks: 2 groups and 1
    s = [head_shard(9, 3, r, 2) for r in range(2)]
    assert [(x.q_start, x.num_heads, x.kv_start, x.num_kv_heads) for x in s] == [(0, 6, 0, 2), (6, 3, 2, 1)]
    for q_heads, kv_heads, world in [(6, 3, 4), (4, 2, 8)]:
        with pytest.raises(ValueError, match="tp size"):
            head_shard(q_heads, kv_heads, 0, world)
