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


def test_an_extend_behind_queued_work_launches_without_waiting_for_it():
    """After the warm-up, an extend whose logit rows are a count not seen before (279, padded to
    320) launches while the GPU is still busy with earlier work: cuBLAS holds the first launch at a
    new GEMM shape until the GPU drains (base.LOGIT_ROW_BUCKET), which the padding and the
    warm-up's LM head at every padded count avoid."""
    from sglite.runtime.executor.model_runner import ModelRunner

    runner = ModelRunner(load_format="dummy", preset="tiny", device="cuda", max_total_tokens=4096,
                         max_running_requests=8)
    warm_up_extend(runner, 1024)
    slots = runner.token_pool.alloc(600)
    row = runner.req_to_token.alloc()
    batch = runner.make_extend_batch([row], [0], [[i % 500 for i in range(600)]], slots, logits_from=[321])
    assert batch.num_logit_rows == 279
    runner.forward(batch, use_cuda_graph=False)  # the extend's own kernels (Triton, attention) once
    torch.cuda.synchronize()
    batch = runner.make_extend_batch([row], [0], [[i % 500 for i in range(600)]], slots, logits_from=[301])
    a = torch.randn(4096, 4096, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(40):  # tens of ms of queued work
        a = a @ a / 64.0
    end.record()
    import time

    t0 = time.perf_counter()
    runner.forward(batch, use_cuda_graph=False)  # 299 rows: padded to 320 as well
    host_ms = 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    assert host_ms < 0.5 * start.elapsed_time(end), (host_ms, start.elapsed_time(end))
