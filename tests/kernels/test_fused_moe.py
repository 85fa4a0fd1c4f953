"""The fused-MoE Triton kernel (under TRITON_INTERPRET on a CPU) against transformers' per-expert
loop on ragged expert loads: hot experts, experts with no token, a single token, tile edges."""

import pytest
import torch

from sglite.kernels.fused_moe import fused_moe, fused_moe_reference, moe_align_block_size
from tests.kernels.pool import DEVICE


def _ragged_ids(gen, num_tokens, num_experts, top_k, *, hot=None, empty=()):
    """Distinct experts per token; `hot` takes slot 0 of the first half; `empty` never chosen."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in empty])
    rows = []
    for t in range(num_tokens):
        perm = allowed[torch.randperm(len(allowed), generator=gen)][:top_k]
        if hot is not None and t < max(1, num_tokens // 2) and hot not in perm:
            perm[0] = hot
        rows.append(perm)
    return torch.stack(rows)


def _inputs(gen, num_tokens, hidden, inter, num_experts, top_k, **ids_kw):
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    ids = _ragged_ids(gen, num_tokens, num_experts, top_k, **ids_kw)
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]


CASES = {
    # tokens, hidden, inter, experts, top_k, ids options
    "hot-and-empty": (37, 64, 48, 8, 2, dict(hot=3, empty=(5, 6))),
    "one-token": (1, 64, 32, 8, 2, {}),
    "most-experts-empty": (5, 32, 32, 16, 2, dict(hot=0)),
    "tile-edges": (23, 48, 40, 4, 3, dict(hot=1, empty=(2,))),  # K, N not multiples of the tiles
    "top-1": (19, 32, 16, 4, 1, dict(hot=2)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_m", [16, 32])
def test_fused_moe_matches_reference_on_ragged_loads(case, block_m):
    num_tokens, hidden, inter, num_experts, top_k, ids_kw = CASES[case]
    gen = torch.Generator().manual_seed(list(CASES).index(case) * 100 + block_m)
    x, w13, w2, weights, ids = _inputs(gen, num_tokens, hidden, inter, num_experts, top_k, **ids_kw)
    config = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    out = fused_moe(x, w13, w2, weights, ids, config=config)
    ref = fused_moe_reference(x, w13, w2, weights, ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().max() > 0.1  # the check compares real outputs, not zeros


def test_default_tiles_and_a_hot_expert_spanning_many_blocks():
    gen = torch.Generator().manual_seed(7)
    # 64 tokens, every one routed to expert 0 (4 blocks of 16) and one other
    x, w13, w2, weights, ids = _inputs(gen, 64, 32, 32, 8, 2)
    ids[:, 0] = 0
    ids[:, 1] = torch.where(ids[:, 1] == 0, 1, ids[:, 1])
    out = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_align_groups_pairs_by_expert_in_padded_blocks():
    gen = torch.Generator().manual_seed(3)
    ids = _ragged_ids(gen, 29, 8, 2, hot=4, empty=(0, 7)).to(DEVICE)
    block_m = 8
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, 8)
    n = ids.numel()
    counts = torch.bincount(ids.flatten().cpu(), minlength=8)
    padded = (counts + block_m - 1) // block_m * block_m
    assert num_post.item() == padded.sum().item()
    assert sorted_ids.numel() >= num_post.item() and sorted_ids.numel() % block_m == 0
    valid = sorted_ids[: num_post.item()].cpu()
    real = valid[valid < n]
    assert sorted(real.tolist()) == list(range(n))  # every (token, slot) pair exactly once
    assert (sorted_ids[num_post.item():] == n).all()  # beyond: padding only
    flat = ids.flatten().cpu()
    for b in range(num_post.item() // block_m):  # each block holds one expert's pairs
        block = valid[b * block_m : (b + 1) * block_m]
        block = block[block < n]
        assert len(block) and (flat[block.long()] == expert_ids[b].item()).all()
    assert 0 not in expert_ids[: num_post.item() // block_m].tolist()  # empty experts get no block


def test_no_tokens_and_bad_shapes():
    w13, w2 = torch.randn(4, 32, 16), torch.randn(4, 16, 16)
    ids = torch.zeros(0, 2, dtype=torch.long)
    assert fused_moe(torch.randn(0, 16), w13, w2, torch.zeros(0, 2), ids).shape == (0, 16)
    with pytest.raises(ValueError, match="fused_moe"):
        fused_moe(torch.randn(3, 8), w13, w2, torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [1, 64, 300, 1000])
def test_bf16_on_gpu_with_the_default_tiles_and_in_a_cuda_graph(num_tokens):
    """Every tile row of moe_config, bf16 against an fp32 reference on the upcast inputs; the
    same call captured in a CUDA graph and replayed on new routing gives the new answer."""
    from sglite.runtime.models.layers.moe import select_experts

    gen = torch.Generator("cuda").manual_seed(num_tokens)
    num_experts, hidden, inter, top_k = 32, 512, 256, 4

    def draw():
        x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
        logits = torch.randn(num_tokens, num_experts, device="cuda", generator=gen)
        weights, ids = select_experts(logits, top_k, renormalize=True)
        return x, weights.bfloat16(), ids

    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.05).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * 0.05).bfloat16()

    def rel_err(out, x, weights, ids):
        ref = fused_moe_reference(x.float(), w13.float(), w2.float(), weights.float(), ids)
        return ((out.float() - ref).norm() / ref.norm()).item()

    x, weights, ids = draw()
    assert rel_err(fused_moe(x, w13, w2, weights, ids), x, weights, ids) < 1e-2
    static = [t.clone() for t in (x, weights, ids)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(*static[:1], w13, w2, *static[1:])
    fresh = draw()
    for buf, new in zip(static, fresh):
        buf.copy_(new)
    out.fill_(float("nan"))
    graph.replay()
    assert rel_err(out, *fresh) < 1e-2


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [
    (1, 8, 2, 16), (29, 8, 2, 8), (64, 128, 8, 16), (37, 12, 3, 32), (200, 128, 8, 16), (5, 16, 2, 64)])
def test_align_kernel_equals_the_torch_ops(num_tokens, num_experts, top_k, block_m):
    """The one-launch align (the interpreter here) gives exactly the torch ops' answer: the same
    stable order within each expert, padding, block experts and padded length; chunks of 64 pairs
    cross at 64 / 512 / 1600 pairs, experts need not be a power of 2, some get no pair."""
    from sglite.kernels import fused_moe as fm

    gen = torch.Generator().manual_seed(num_tokens * 7 + num_experts)
    ids = _ragged_ids(gen, num_tokens, num_experts, top_k, hot=1, empty=(0, num_experts - 1)).to(DEVICE)
    sorted_ids, expert_ids, num_post = fm.moe_align_block_size(ids, block_m, num_experts)
    ref_sorted, ref_experts, ref_post = fm.moe_align_block_size_torch(ids, block_m, num_experts)
    assert torch.equal(num_post, ref_post)
    assert torch.equal(expert_ids, ref_experts)
    assert torch.equal(sorted_ids, ref_sorted)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,renorm", [
    (1, 8, 2, True), (13, 60, 4, False), (40, 128, 8, True), (7, 12, 3, True), (5, 16, 1, False)])
def test_route_kernel_matches_select_experts(num_tokens, num_experts, top_k, renorm):
    """The one-launch router (interpreted) against select_experts + cast: the same experts in the
    same order (bf16 logits tie: then any of the tied experts, as torch.topk's order is
    unspecified), weights equal to fp32 rounding, cast to the activation dtype."""
    from sglite.kernels.fused_moe import route
    from sglite.runtime.models.layers.moe import select_experts

    gen = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        w, ids = route(logits.to(dtype), top_k, renormalize=renorm, dtype=dtype)
        ref_w, ref_ids = select_experts(logits.to(dtype), top_k, renormalize=renorm)
        assert ids.dtype == torch.int64 and w.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(ids, ref_ids)
        probs = torch.softmax(logits.to(dtype).float(), -1)
        assert torch.equal(probs.gather(1, ids), probs.gather(1, ref_ids))  # ties only differ
        assert all(len(set(r)) == top_k for r in ids.tolist())
        torch.testing.assert_close(w, ref_w.to(dtype), atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 1e-2)
