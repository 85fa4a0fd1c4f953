"""Decode forwards replayed from CUDA graphs, one graph per batch size, captured at start-up.

At batch 1 an eager decode of a 1-8B model launches ~10 kernels per layer; the launches take
longer than the kernels (each only streams a few MB of weights), so the GPU idles between them. A
graph replays the whole forward with one launch.

A graph bakes in its tensors' addresses and shapes, so:
- a decode step stages its whole batch as one int64 block (sglite.kernels.decode_batch: tokens,
  positions, rows, lengths, slots) and copies it to the device in one host-to-device copy; each
  graph starts with the kernel that unpacks the block into the forward's static input buffers and
  writes the new slots into req_to_token (before: ~10 small ops outside the graph, though the
  served bs-1 time did not measurably change, docs/benchmarks.md); a size-P graph reads the
  first 6 * P entries of the block;
- tokens sampled on the device (the overlapped decode) are fed through a static buffer the graph
  reads (`fed_ids`): one device-to-device copy, no gather op;
- the smallest captured size >= bs runs ("padded" size); pad rows [bs, padded) decode a harmless
  dummy (PAD_ROW): request row 0 (any row holds valid slot numbers, the table starts zeroed),
  length 1, K/V into the reserved padding slot 0, nothing written into req_to_token; their logits
  are dropped;
- the attention backend fixes its split count and scratch per captured size
  (`init_cuda_graph_state`, `init_forward_capture`), independent of the captured lengths.
The returned logits and input ids are views into the graph's buffers: valid until the next forward.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from sglite.kernels.decode_batch import PAD_ROW, STAGED_FIELDS, stage_decode_batch, unpack_decode_batch
from sglite.runtime.executor.attention.base import ForwardBatch, ForwardMode
from sglite.runtime.executor.transfer import copy_to_device_async

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
        self.staged = torch.zeros(STAGED_FIELDS * max_bs, dtype=torch.int64, device=dev)
        self.fed_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._pad_rows = torch.tensor(PAD_ROW, dtype=torch.int64).view(-1, 1).expand(-1, max_bs)
        # the forward's inputs: written by the unpack kernel at the start of each graph
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

    def padded_size(self, bs: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]

    def replay_decode(self, rows: list[int], seq_lens: list[int], token_ids: list[int],
                      out_cache_loc: torch.Tensor, *, fed_ids: torch.Tensor | None = None,
                      fed_index: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step from host lists (ModelRunner.forward_decode checked them): one
        host-to-device copy of the staged block (plus one device copy of fed_ids), one replay.
        Returns (logits float32 [bs, vocab], input ids [bs]), views the next replay overwrites."""
        bs = len(rows)
        padded = self.padded_size(bs)
        if fed_ids is not None:
            self.fed_ids[: len(fed_ids)].copy_(fed_ids, non_blocking=True)
        host = stage_decode_batch(token_ids, seq_lens, rows, out_cache_loc, num_rows=padded,
                                  num_fed=0 if fed_ids is None else len(fed_ids), fed_index=fed_index)
        copy_to_device_async(self.staged[: STAGED_FIELDS * padded], host.view(-1))
        self.graphs[padded].replay()
        return self.logits[padded][:bs], self.input_ids[:bs]

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """A decode ForwardBatch already on the device (tests, benchmarks), staged by device copies.
        Logits float32 [bs, vocab] (a view, overwritten by the next replay)."""
        bs = batch.batch_size
        padded = self.padded_size(bs)
        staged = self.staged[: STAGED_FIELDS * padded].view(STAGED_FIELDS, padded)
        staged[:, bs:] = self._pad_rows[:, : padded - bs].to(staged.device, non_blocking=True)
        staged[1, :bs] = -1
        for field, src in ((0, batch.input_ids), (2, batch.positions), (3, batch.req_pool_indices),
                           (4, batch.seq_lens), (5, batch.out_cache_loc)):
            staged[field, :bs].copy_(src, non_blocking=True)
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

    def _run_staged(self, batch: ForwardBatch) -> torch.Tensor:
        """What a graph holds: unpack the staged block into the batch's buffers, then the model."""
        bs = batch.batch_size
        unpack_decode_batch(
            self.staged[: STAGED_FIELDS * bs].view(STAGED_FIELDS, bs), self.fed_ids,
            batch.input_ids, batch.positions, batch.req_pool_indices, batch.seq_lens,
            batch.prefix_lens, batch.out_cache_loc, batch.req_to_token)
        return self.runner._run_model(batch)

    def _capture_all(self) -> None:
        backend, pool = self.runner.attn_backend, torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        # largest first: smaller graphs then reuse the pool memory the largest one reserved
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):
                batch = self._static_batch(bs)
                backend.init_forward_capture(batch)
                # pad rows only: the warm-up really runs, and must not touch live KV or tables
                self.staged[: STAGED_FIELDS * bs].view(STAGED_FIELDS, bs).copy_(self._pad_rows[:, :bs])
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles the allocator
                    self._run_staged(batch)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = self._run_staged(batch)
                self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)
