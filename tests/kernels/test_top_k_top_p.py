"""top-k / top-p filtering by threshold bisection against the sort-based filter: rows with many
ties (bf16 logits), cuts inside a run of ties, top_k past the vocab, filters off."""

import pytest
import torch

from sglite.kernels.reference import top_k_top_p_filter_ref
from sglite.kernels.top_k_top_p import NO_TOP_K, top_k_top_p_filter
from tests.kernels.pool import DEVICE


def _probs(bs, vocab, gen, scale=3.0):
    logits = (torch.randn(bs, vocab, generator=gen) * scale).to(torch.bfloat16).float()  # many ties
    return torch.softmax(logits / 0.7, dim=-1)


def _mid_gap_top_p(row: torch.Tensor, rank: int) -> float:
    """A top_p halfway between the mass ranked before `rank` and before rank + 1 (a stable sort's
    cumulative sum): the filter keeps exactly ranks 0..rank, away from rounding."""
    sorted_p = row.double().sort(descending=True, stable=True).values
    before = sorted_p.cumsum(0) - sorted_p
    return float((before[rank] + before[rank + 1]) / 2)


def _cases(probs, gen):
    bs, vocab = probs.shape
    ks, ps = [], []
    for i in range(bs):
        kind = i % 5
        # a cut at a rank whose probability (the margin's double) is far above float rounding
        ranks = (probs[i].sort(descending=True).values[:20] > 1e-3).nonzero().flatten()
        rank = int(ranks[torch.randint(0, len(ranks), (), generator=gen)])
        ks.append([NO_TOP_K, int(torch.randint(1, 40, (), generator=gen)), NO_TOP_K, 5, vocab + 3][kind])
        ps.append([_mid_gap_top_p(probs[i], rank), 1.0, 1.0, _mid_gap_top_p(probs[i], rank), 1e-9][kind])
    return torch.tensor(ks, dtype=torch.int64), torch.tensor(ps, dtype=torch.float32)


@pytest.mark.parametrize("bs,vocab,tile", [(5, 97, None), (10, 300, None), (5, 300, dict(CAP=1000)),
                                           (5, 300, dict(NC=2, CAP=40))],
                         ids=["97", "300", "copy-at-once", "2-thresholds"])
def test_matches_sort_filter(bs, vocab, tile):
    gen = torch.Generator().manual_seed(vocab)
    probs = _probs(bs, vocab, gen)
    ks, ps = _cases(probs, gen)
    expected = top_k_top_p_filter_ref(probs, ks, ps)
    out = top_k_top_p_filter(probs.to(DEVICE), ks.to(DEVICE), ps.to(DEVICE), tile=tile).cpu()
    for i in range(bs):
        assert torch.equal(out[i], expected[i]), f"row {i} (top_k {ks[i].item()}, top_p {ps[i].item():.6f})"
    assert ((out > 0).sum(-1) >= 1).all()  # the top token always stays


def test_cut_inside_ties():
    """top_k and top_p that end inside a run of equal probabilities keep its first tokens by id."""
    probs = torch.tensor([[0.1, 0.2, 0.1, 0.3, 0.1, 0.1, 0.1]])
    for k, p, kept in [(3, 1.0, [1, 3, 0]), (4, 1.0, [1, 3, 0, 2]), (NO_TOP_K, 0.55, [1, 3, 0]),
                       (NO_TOP_K, 0.65, [1, 3, 0, 2]), (2, 0.65, [1, 3]), (NO_TOP_K, 1e-9, [3])]:
        ks, ps = torch.tensor([k]), torch.tensor([p])
        out = top_k_top_p_filter(probs.to(DEVICE), ks.to(DEVICE), ps.to(DEVICE)).cpu()
        assert torch.equal(out, top_k_top_p_filter_ref(probs, ks, ps)), (k, p)
        assert sorted(out[0].nonzero().flatten().tolist()) == sorted(kept), (k, p)


@pytest.mark.parametrize("k,p", [(30, 1.0), (NO_TOP_K, 0.622), (70, 0.9), (NO_TOP_K, 0.4)])
def test_ties_across_programs(k, p):
    """A run of 100 equal probabilities over several steps of the row: the tokens kept from it
    are its first by id, counted across the steps."""
    probs = torch.tensor([[0.004] * 40 + [0.5] + [0.004] * 60 + [0.096]])
    ks, ps = torch.tensor([k]), torch.tensor([p])
    expected = top_k_top_p_filter_ref(probs, ks, ps)
    out = top_k_top_p_filter(probs.to(DEVICE), ks.to(DEVICE), ps.to(DEVICE)).cpu()
    assert torch.equal(out, expected), (k, p)


def test_top_p_one_keeps_every_token():
    """top_p = 1 is off: a row of a batch where another row uses top_p keeps all its tokens (a
    float32 cumulative sum over Llama-3's 128k probabilities passes 1.0 long before the end; the
    sort-based filter cut there and dropped ~half the vocabulary)."""
    gen = torch.Generator().manual_seed(0)
    probs = _probs(2, 128256, gen, scale=1.0)
    ks, ps = torch.tensor([NO_TOP_K, NO_TOP_K]), torch.tensor([0.9, 1.0])
    kept = (top_k_top_p_filter_ref(probs, ks, ps) > 0).sum(-1)
    assert kept[1] == 128256 and kept[0] < 128256


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        top_k_top_p_filter(torch.ones(2, 8, dtype=torch.float16), torch.ones(2, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="need 2 entries"):
        top_k_top_p_filter(torch.ones(2, 8), torch.ones(3, dtype=torch.int64), torch.ones(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bs", [1, 64])
def test_real_vocab_matches_sort_filter(bs):
    gen = torch.Generator().manual_seed(bs)
    probs = _probs(bs, 128256, gen)
    ks, ps = _cases(probs, gen)
    expected = top_k_top_p_filter_ref(probs.cuda(), ks.cuda(), ps.cuda()).cpu()
    out = top_k_top_p_filter(probs.cuda(), ks.cuda(), ps.cuda()).cpu()
    assert torch.equal(out, expected)
