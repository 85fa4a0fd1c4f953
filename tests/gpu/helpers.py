"""Shared helpers of the GPU runtime tests: a random-weight 1B runner, prefill and decode."""

import torch


def make_runner(**kw):
    """llama-3.2-1b shape with random bf16 weights (seed 0: every runner gets the same weights)."""
    from sglite.runtime.executor.model_runner import ModelRunner

    args = dict(preset="llama-3.2-1b", load_format="dummy", device="cuda", dtype="bfloat16",
                max_total_tokens=16384, max_running_requests=16, max_context_len=2048, seed=0)
    return ModelRunner(**{**args, **kw})


def prefill(runner, prompts: list[list[int]], slots=None) -> tuple[list[int], torch.Tensor]:
    """Extend every prompt from scratch in one batch; returns the rows and the last logits."""
    rows = [runner.req_to_token.alloc() for _ in prompts]
    if slots is None:
        slots = runner.token_pool.alloc(sum(len(p) for p in prompts))
    batch = runner.make_extend_batch(rows, [0] * len(prompts), prompts, slots)
    return rows, runner.forward(batch).clone()


def decode(runner, rows, seq_lens, last_ids, slots=None, **kw) -> torch.Tensor:
    if slots is None:
        slots = runner.token_pool.alloc(len(rows))
    batch = runner.make_decode_batch(rows, seq_lens, last_ids, slots)
    return runner.forward(batch, **kw).clone()


def page_slots(runner, lengths: list[int]) -> list[torch.Tensor]:
    """Each request's slots for positions [0, length), laid out on whole pages of the runner's
    paged pool as the CacheManager places them (position p at offset p % page_size)."""
    size = runner.token_pool.page_size
    out = []
    for n in lengths:
        pages = torch.from_numpy(runner.token_pool.alloc_pages(-(-n // size)))
        out.append((pages[:, None] * size + torch.arange(size)).flatten()[:n])
    return out
