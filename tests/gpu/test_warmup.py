"""The scheduler's warm-up extend (scheduler/warmup.py) touches no KV but the padding slot 0 and
leaves req_to_token as it was (zeros, host mirror equal), and afterwards an extend as large, with
logits for every row, takes no new segment from the driver."""

import pytest
import torch

from sglite.runtime.sampling.logprobs import pack_rows
from sglite.runtime.scheduler.stats import allocator_counters
from sglite.runtime.scheduler.warmup import warm_up_extend

pytestmark = pytest.mark.gpu


def test_warm_up_writes_only_the_padding_slot_and_sizes_the_allocator():
    from sglite.runtime.executor.model_runner import ModelRunner

    runner = ModelRunner(load_format="dummy", preset="tiny", device="cuda", max_total_tokens=4096,
                         max_running_requests=8)
    k, v = runner.kv_cache.get_kv(0)
    k.fill_(1.0)
    v.fill_(1.0)
    warm_up_extend(runner, 512)
    assert bool((k[1:] == 1.0).all()) and bool((v[1:] == 1.0).all())
    assert not bool(runner.req_to_token.table.any())
    assert not bool(runner.req_to_token.host.any())
    before = allocator_counters()["device_allocs"]
    slots = runner.token_pool.alloc(300)
    row = runner.req_to_token.alloc()
    batch = runner.make_extend_batch([row], [0], [list(range(300))], slots, logits_from=[0])
    pack_rows(runner.forward(batch, use_cuda_graph=False), list(range(300)), [5] * 300)
    torch.cuda.synchronize()
    assert allocator_counters()["device_allocs"] == before
