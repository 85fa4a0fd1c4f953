"""One extend forward at the scheduler's token budget before serving, on CUDA (vLLM's profile run).

Its activations, its logits for every row and their input-logprob pack pass through torch's caching
allocator once, so the allocator holds segments for the largest forward the scheduler builds:
without it the first forward larger than any before (a select's first large batch of choices with
their logits) grows the pool with cudaMalloc in the middle of serving (H200, 20-shot select: 7
segments taken during the timed run without the warm-up, none with it; the forwards' share of busy
time 0.79 -> 0.86 in one call, docs/benchmarks.md).

Then the LM head once at every padded row count up to the budget (executor/attention/base.py's
LOGIT_ROW_BUCKET): cuBLAS holds the first launch at each new shape until the GPU is idle, and a
forward's LM head is the last launch before the host's work on the next batch.
"""

from __future__ import annotations

import logging

import torch

from sglite.runtime.executor.attention.base import LOGIT_ROW_BUCKET
from sglite.runtime.sampling.logprobs import pack_rows

logger = logging.getLogger(__name__)

WARMUP_TOP_K = 5  # the pack's top-k width (OpenAI's top_logprobs go to 20: the pack is small)
# the LM head's padded row counts are warmed up to this many rows (the token budget is usually
# below it; with no budget, --chunked-prefill-size 0, larger counts keep cuBLAS's first-call wait)
LM_HEAD_WARMUP_MAX_ROWS = 16384


def warm_up_extend(runner, num_tokens: int) -> None:
    """Run an extend of num_tokens new tokens of one request that writes only the padding slot 0
    (its KV) and zeros into request row 0 of req_to_token (host mirror too: as it starts), with
    logits for all rows packed as input logprobs; then free everything (the allocator keeps it)."""
    device = getattr(runner, "device", None)
    if device is None or device.type != "cuda" or getattr(runner, "tp", None) is not None:
        return
    num_tokens = max(1, min(num_tokens, runner.max_context_len - 1, runner.token_pool.total_size))
    batch = runner.make_extend_batch(
        [0], [0], [[0] * num_tokens], torch.zeros(num_tokens, dtype=torch.int64), logits_from=[0])
    try:
        logits = runner.forward(batch, use_cuda_graph=False)
        pack_rows(logits, [0] * num_tokens, [WARMUP_TOP_K] * num_tokens)
        torch.cuda.synchronize(runner.device)
        del logits
        warm_up_lm_head(runner.model, min(num_tokens, LM_HEAD_WARMUP_MAX_ROWS), runner.device)
    except torch.cuda.OutOfMemoryError:
        # a real batch this large with input logprobs on every row would not fit either
        torch.cuda.empty_cache()
        logger.warning("the warm-up extend of %d tokens with logits for every row ran out of GPU "
                       "memory: input-logprob batches that large will fail; lower "
                       "--chunked-prefill-size", num_tokens)
    logger.info("warm-up extend: %d tokens, allocator reserved %.2f GiB", num_tokens,
                torch.cuda.memory_reserved(runner.device) / 2**30)


def warm_up_lm_head(model, max_rows: int, device) -> None:
    """F.linear on the LM head's weight at each multiple of LOGIT_ROW_BUCKET up to max_rows."""
    head = getattr(model, "lm_head_weight", None)
    if head is None:
        return
    x = torch.zeros(-(-max_rows // LOGIT_ROW_BUCKET) * LOGIT_ROW_BUCKET, head.shape[1],
                    dtype=head.dtype, device=device)
    with torch.inference_mode():
        for m in range(LOGIT_ROW_BUCKET, x.shape[0] + 1, LOGIT_ROW_BUCKET):
            torch.nn.functional.linear(x[:m], head)
    torch.cuda.synchronize(device)
