"""The sampler on a GPU: its top-k/top-p search kernel (batches of TOP_K_TOP_P_KERNEL_MIN_BS rows
and more) draws the same seeded tokens as the sort-based filter, on Llama-3's vocabulary."""

import pytest
import torch

import sglite.runtime.sampling.sampler as sampler_module
from sglite.protocol import SamplingParams
from sglite.runtime.sampling.sampler import SamplingBatch

pytestmark = pytest.mark.gpu


def test_search_and_sort_draw_the_same_tokens(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=s)
              for s, (t, p, k) in enumerate([(0.7, 0.9, -1), (1.0, 0.95, 40), (0.8, 1.0, 20), (1.2, 0.5, -1)] * 4)]
    draws = {}
    for path, min_bs in (("search", 1), ("sort", 1 << 30)):
        monkeypatch.setattr(sampler_module, "TOP_K_TOP_P_KERNEL_MIN_BS", min_bs)
        tokens = []
        for step in range(8):
            logits = (torch.randn(len(params), 128256, generator=gen) * 3).to(torch.bfloat16).float().cuda()
            batch = SamplingBatch.from_requests(params, [[0] * step] * len(params), device="cuda")
            tokens.append(batch.sample(logits).tolist())
        draws[path] = tokens
        gen.manual_seed(0)
    assert draws["search"] == draws["sort"]
