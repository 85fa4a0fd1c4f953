"""`sgl.Runtime(quantization="fp8", kv_cache_dtype="fp8_e4m3")` on the embedded SmolLM2 (CPU
reference path): the runtime starts, still answers a simple question (greedy), and reports twice
the KV capacity the bf16 pool has in the same default memory."""

from __future__ import annotations

import sglite as sgl
from sglite.runtime.executor import model_runner
from sglite.runtime.mem.kv_cache import bytes_per_token
from sglite.runtime.models.loader import load_config, resolve_model


@sgl.function
def ask(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0.0))


def test_fp8_runtime_answers_and_doubles_the_pool():
    import torch

    config = load_config(resolve_model(None))
    bf16_capacity = model_runner._CPU_KV_BYTES // bytes_per_token(config, torch.bfloat16) - 1
    with sgl.Runtime(quantization="fp8", kv_cache_dtype="fp8_e4m3", device="cpu", max_running_requests=4,
                     log_interval=0) as rt:
        info = rt.get_server_info()
        state = ask.run(question="What is the capital of France?", backend=rt)
        answer = state["answer"]
    assert "Paris" in answer, answer
    # FP8 slots take half the bytes: 2x the tokens (+1 where the budget's remainder fits one more)
    assert 2 * (bf16_capacity + 1) <= info["max_total_tokens"] + 1 <= 2 * (bf16_capacity + 1) + 1
