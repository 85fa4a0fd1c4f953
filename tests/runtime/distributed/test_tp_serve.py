"""`sglite serve --tp-size 2` on the CPU: the embedded SmolLM2-135M (9 heads, 3 KV heads: 6 heads
on rank 0, 3 on rank 1) split over two gloo ranks answers a batch of greedy requests with the
text of the one-rank session runtime, 32 tokens each. (Where the session runtime is on a GPU, the
same over NCCL on two GPUs.)"""

import pytest
import torch

from tests.conftest import E2E_RUNTIME_ARGS

PROMPTS = ["The capital of France is", "Write a haiku about the sea:\n",
           "def fibonacci(n):", "Three things to pack for a hike:"]
GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


def _answers(client):
    rids = []
    from sglite import protocol

    for text in PROMPTS:
        rids.append(client.new_rid())
        client.send(protocol.GenerateReq(rid=rids[-1], text=text, sampling_params=GREEDY))
    results = client.collect(rids)
    return [results[rid] for rid in rids]


@pytest.fixture(scope="module")
def tp_runtime():
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("the session runtime is on the GPU and tp 2 there needs two (NCCL)")
    from sglite.launch import RuntimeProcess

    with RuntimeProcess(None, timeout=600, tp_size=2, **E2E_RUNTIME_ARGS) as rt:
        yield rt


@pytest.mark.slow  # a second runtime of the embedded model (two processes) next to the session one
def test_tp2_serves_the_embedded_model_with_tp1_greedy_text(tp_runtime, runtime_process, make_client):
    want = _answers(make_client(runtime_process.address, alive=runtime_process.is_alive))
    got = _answers(make_client(tp_runtime.address, alive=tp_runtime.is_alive, timeout=120))
    for w, g in zip(want, got):
        assert w["error"] is None and g["error"] is None, (w["error"], g["error"])
        assert g["meta_info"]["completion_tokens"] == w["meta_info"]["completion_tokens"] == 32
        assert g["text"] == w["text"]
    assert len({w["text"] for w in want}) == len(PROMPTS)
