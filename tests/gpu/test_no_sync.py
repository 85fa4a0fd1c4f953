"""The overlapped decode loop only overlaps if nothing between two launches waits for the GPU.
These run the per-step device work of that loop with torch's sync debug mode set to raise:
the sampler for requests the loop launches ahead (penalties, min_new_tokens, seeded sampling,
tokens still pending on the device) and a decode step through a CUDA graph with device-fed ids.
(An index_put with a Python scalar once synchronized here and cost penalized requests ~1 ms a
token: docs/benchmarks.md, issue 6 third session.)"""

import contextlib

import numpy as np
import pytest
import torch

from sglite.protocol import SamplingParams
from sglite.runtime.sampling.sampler import SamplingBatch
from tests.gpu.helpers import make_runner, prefill

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_sampler_never_waits_for_the_gpu():
    params = [SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.3),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, seed=3,
                             presence_penalty=0.5),
              SamplingParams(temperature=0, min_new_tokens=5, stop_token_ids=[11])] * 2
    outputs = [[5, 6, 5], [7], [8, 9]] * 2
    prompts = [np.arange(3, 40), np.arange(2), np.arange(7)] * 2
    logits = torch.randn(6, 32000, device="cuda")  # 6 rows: the top-k/top-p search kernel's path
    pending = torch.tensor([12, 13], device="cuda")
    SamplingBatch.from_requests(params, outputs, prompts, eos_ids=[2], device="cuda",
                                pending_ids=pending).sample(logits)  # warm-up: allocations
    with no_sync():
        ids = SamplingBatch.from_requests(params, outputs, prompts, eos_ids=[2], device="cuda",
                                          pending_ids=pending).sample(logits)
    assert ids.shape == (6,)


def test_graph_decode_step_never_waits_for_the_gpu():
    runner = make_runner(cuda_graph_max_bs=8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    rows, _ = prefill(runner, prompts)
    fed = torch.tensor([9, 10, 11], device="cuda")
    for step in range(2):  # the first step warms up the pinned-memory cache
        seq_lens = [len(p) + 1 + step for p in prompts]
        slots = runner.token_pool.alloc(2)
        with no_sync() if step else contextlib.nullcontext():
            logits, ids = runner.forward_decode(rows, seq_lens, [0, 0], slots, fed_ids=fed, fed_index=[2, 0])
            next_ids = logits.argmax(-1)
    assert ids.tolist() == [11, 9] and next_ids.shape == (2,)
