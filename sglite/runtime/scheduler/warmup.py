"""Extend forwards at the scheduler's token budget and below before serving, on CUDA (vLLM's
profile run, plus smaller sizes).

Their activations, their logits for every row and the input-logprob packs pass through torch's
caching allocator once, so the allocator holds segments for the largest forward the scheduler
builds: without it the first forward larger than any before (a select's first large batch of
choices with their logits) grows the pool with cudaMalloc in the middle of serving (H200, 20-shot
select: 7 segments taken during the timed run without the warm-up, none with it; the forwards'
share of busy time 0.79 -> 0.86 in one call). The halving sizes are for cuBLAS, which picks other
kernels for smaller products and loads each at its first use; whether such a load is what still
makes one launch of the select wait for the GPU (its LM head, bench/timeline.py) is unmeasured.
"""

from __future__ import annotations

import logging

import torch

from sglite.runtime.sampling.logprobs import pack_rows

logger = logging.getLogger(__name__)

MIN_TOKENS = 16
WARMUP_TOP_K = 5  # the pack's top-k width (OpenAI's top_logprobs go to 20: the pack is small)


def warm_up_extend(runner, num_tokens: int) -> None:
    """Extends of num_tokens, num_tokens / 2, ... down to MIN_TOKENS new tokens of one request,
    writing only the padding slot 0 (their KV) and zeros into request row 0 of req_to_token (host
    mirror too: as it starts), with logits for all rows packed as input logprobs; then everything
    is freed (the allocator keeps it). The smaller sizes make cuBLAS load the kernels it picks for
    smaller products (a module loaded at a kernel's first use waits for the GPU), about twice the
    tokens of the largest forward in all."""
    device = getattr(runner, "device", None)
    if device is None or device.type != "cuda" or getattr(runner, "tp", None) is not None:
        return
    n = max(1, min(num_tokens, runner.max_context_len - 1, runner.token_pool.total_size))
    sizes = [n]
    while sizes[-1] // 2 >= MIN_TOKENS:
        sizes.append(sizes[-1] // 2)
    for size in sizes:
        if not _extend(runner, size):
            break
    logger.info("warm-up extends of %d..%d tokens, allocator reserved %.2f GiB", sizes[-1], n,
                torch.cuda.memory_reserved(device) / 2**30)


def _extend(runner, num_tokens: int) -> bool:
    batch = runner.make_extend_batch(
        [0], [0], [[0] * num_tokens], torch.zeros(num_tokens, dtype=torch.int64), logits_from=[0])
    try:
        logits = runner.forward(batch, use_cuda_graph=False)
        pack_rows(logits, [0] * num_tokens, [WARMUP_TOP_K] * num_tokens)
        torch.cuda.synchronize(runner.device)
        return True
    except torch.cuda.OutOfMemoryError:
        # a real batch this large with input logprobs on every row would not fit either
        torch.cuda.empty_cache()
        logger.warning("the warm-up extend of %d tokens with logits for every row ran out of GPU "
                       "memory: input-logprob batches that large will fail; lower "
                       "--chunked-prefill-size", num_tokens)
        return False
