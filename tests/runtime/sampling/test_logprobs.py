"""gather_logprobs: the batched gather equals the per-row log_softmax, index and topk."""

import torch

from sglite.runtime.sampling.logprobs import gather_logprobs


def test_batched_gather_matches_per_row_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g, dtype=torch.float32) * 4
    ids, tops = [3, 0, 39, 7, 7], [0, 2, 5, 1, 0]
    chosen, top = gather_logprobs(logits.to(torch.bfloat16).float(), ids, tops)
    lp = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    for row, (t, k) in enumerate(zip(ids, tops)):
        assert abs(chosen[row] - float(lp[row, t])) < 1e-6
        values, top_ids = lp[row].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.int64))
        assert [i for _, i in top[row]] == top_ids.tolist()
        assert all(isinstance(i, int) for _, i in top[row])
        assert torch.allclose(torch.tensor([v for v, _ in top[row]]), values)


def test_no_rows_and_k_above_vocab():
    assert gather_logprobs(torch.empty(0, 8), [], []) == ([], [])
    chosen, top = gather_logprobs(torch.zeros(1, 4), [2], [10])  # k capped at the vocabulary
    assert len(top[0]) == 4 and abs(chosen[0] + torch.log(torch.tensor(4.0)).item()) < 1e-6
