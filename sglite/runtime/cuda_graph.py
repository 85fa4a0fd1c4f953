"""Decode forwards replayed from CUDA graphs, one graph per batch size, captured at start-up.

At batch 1 an eager decode of a 1-8B model launches ~10 kernels per layer; the launches take
longer than the kernels (each only streams a few MB of weights), so the GPU idles between them. A
graph replays the whole forward with one launch.

A graph bakes in its tensors' addresses and shapes, so:
- inputs live in static buffers sized for the largest captured batch; `replay` copies the batch
  into their first `bs` rows and runs the smallest captured size >= bs ("padded" size);
- pad rows [bs, padded) decode a harmless dummy: request row 0 (any row holds valid slot numbers,
  the table starts zeroed), length 1, and the new token's K/V go to the reserved padding slot 0, so
  a pad never writes into a live request's KV; their logits are dropped;
- the attention backend fixes its split count and scratch per captured size
  (`init_cuda_graph_state`, `init_forward_capture`), independent of the captured lengths.
The returned logits are a view into the graph's output buffer: valid until the next forward.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from sglite.runtime.attention.base import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)

MAX_CAPTURE_BS = 512


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, then every 32: at most ~12% of a step is padding
    past batch 128, where the step time grows with bs."""
    if not 1 <= max_bs <= MAX_CAPTURE_BS:
        raise ValueError(f"cuda_graph_max_bs must be in [1, {MAX_CAPTURE_BS}], got {max_bs}")
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, MAX_CAPTURE_BS + 1, 32))
    return [bs for bs in sizes if bs < max_bs] + [max_bs]


class CudaGraphRunner:
    def __init__(self, runner, *, max_bs: int):
        """runner: the ModelRunner (its `_run_model`, `attn_backend`, `req_to_token`, `device`)."""
        self.runner = runner
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = max_bs
        dev = runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.prefix_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.extend_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [bs, vocab] fp32, the graphs' outputs
        runner.attn_backend.init_cuda_graph_state(self.batch_sizes,
                                                  max_context_len=runner.max_context_len)
        t0 = time.perf_counter()
        self._capture_all()
        logger.info("captured %d decode CUDA graphs (bs %s) in %.1f s", len(self.graphs),
                    self.batch_sizes, time.perf_counter() - t0)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and not batch.return_all_logits and batch.batch_size <= self.max_bs

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits float32 [bs, vocab] (a view, overwritten by the next replay)."""
        bs = batch.batch_size
        padded = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        for dst, src in ((self.input_ids, batch.input_ids), (self.positions, batch.positions),
                         (self.req_pool_indices, batch.req_pool_indices),
                         (self.seq_lens, batch.seq_lens), (self.out_cache_loc, batch.out_cache_loc)):
            dst[:bs].copy_(src, non_blocking=True)
        if padded > bs:  # stale pad rows could hold a live request's slot or a long length
            self.seq_lens[bs:padded].fill_(1)
            self.out_cache_loc[bs:padded].fill_(0)
        self.graphs[padded].replay()
        return self.logits[padded][:bs]

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            prefix_lens=self.prefix_lens[:bs],
            extend_lens=self.extend_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_to_token=self.runner.req_to_token.table,
            seq_lens_cpu=[1] * bs,  # not read under capture: the backend sizes for the context limit
            prefix_lens_cpu=[0] * bs,
            extend_lens_cpu=[1] * bs,
        )

    def _capture_all(self) -> None:
        backend, pool = self.runner.attn_backend, torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        # largest first: smaller graphs then reuse the pool memory the largest one reserved
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):
                batch = self._static_batch(bs)
                backend.init_forward_capture(batch)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles the allocator
                    self.runner._run_model(batch)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = self.runner._run_model(batch)
                self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)
