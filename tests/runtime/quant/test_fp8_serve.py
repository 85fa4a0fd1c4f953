"""`sgl.Runtime(quantization="fp8", kv_cache_dtype="fp8_e4m3")` on the embedded SmolLM2 (CPU
reference path): the runtime starts, still answers simple questions (greedy, with the README's system
prompt), and reports twice the KV capacity the bf16 pool has in the same default memory.

Without a system prompt FP8 weights + KV answered "L'Alma, la France, la France" in a fresh venv
on 2026-12-03 (the same commit had passed CI the day before; "Italy" goes wrong with FP8 weights
alone): on a 135M model FP8's noise moves a greedy answer at its first uncertain token."""

from __future__ import annotations

import sglite as sgl
from sglite.runtime.executor import model_runner
from sglite.runtime.mem.kv_cache import bytes_per_token
from sglite.runtime.models.loader import load_config, resolve_model


@sgl.function
def ask(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0.0))


def test_fp8_runtime_answers_and_doubles_the_pool():
    import torch

    config = load_config(resolve_model(None))
    bf16_capacity = model_runner._CPU_KV_BYTES // bytes_per_token(config, torch.bfloat16) - 1
    with sgl.Runtime(quantization="fp8", kv_cache_dtype="fp8_e4m3", device="cpu", max_running_requests=4,
                     log_interval=0) as rt:
        info = rt.get_server_info()
        answers = [ask.run(question=f"What is the capital of {country}?", backend=rt)["answer"]
                   for country in ("France", "Japan")]
    assert "Paris" in answers[0] and "Tokyo" in answers[1], answers
    # FP8 slots take half the bytes: 2x the tokens (+1 where the budget's remainder fits one more)
    assert 2 * (bf16_capacity + 1) <= info["max_total_tokens"] + 1 <= 2 * (bf16_capacity + 1) + 1
