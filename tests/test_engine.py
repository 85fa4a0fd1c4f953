"""sgl.Engine (sglite.engine): its own runtime process on the embedded model; text, lists, token
ids, streaming, async, and the same greedy output as the frontend on a runtime with the same args."""

import asyncio

import pytest

import sglite as sgl
from sglite.engine import Engine
from sglite.lang.backend.base import RuntimeRequestError
from tests.conftest import E2E_RUNTIME_ARGS

GREEDY = {"temperature": 0, "max_new_tokens": 5}
PROMPTS = ["The capital of France is", "One, two, three,", "The opposite of hot is"]


@pytest.fixture(scope="module")
def engine():
    with Engine(launch_timeout=900, **E2E_RUNTIME_ARGS) as e:
        yield e


def test_text_list_and_ids(engine, embedded_tokenizer):
    one = engine.generate(PROMPTS[0], GREEDY)
    assert set(one) == {"text", "output_ids", "meta_info"}
    assert one["text"] and len(one["output_ids"]) == one["meta_info"]["completion_tokens"] == 5
    assert embedded_tokenizer.decode(one["output_ids"]) == one["text"]
    meta = one["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "matched": None}
    assert "output_token_logprobs" not in meta and meta["id"]
    assert meta["prompt_tokens"] == len(embedded_tokenizer(PROMPTS[0]).input_ids)
    many = engine.generate(PROMPTS, [GREEDY, {"temperature": 0, "max_new_tokens": 3}, GREEDY])
    assert [m["text"] for m in many][0] == one["text"]
    assert many[1]["meta_info"]["completion_tokens"] == 3
    ids = [embedded_tokenizer(p).input_ids for p in PROMPTS]
    by_ids = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert by_ids[0]["text"] == one["text"] and by_ids[2]["text"] == many[2]["text"]
    single_ids = engine.generate(input_ids=ids[0], sampling_params=GREEDY)
    assert single_ids["output_ids"] == one["output_ids"]
    lp = engine.generate(PROMPTS[0], GREEDY, return_logprob=True, top_logprobs_num=2)
    assert [t[1] for t in lp["meta_info"]["output_token_logprobs"]] == one["output_ids"]
    assert all(len(row) == 2 for row in lp["meta_info"]["output_top_logprobs"])
    with pytest.raises(RuntimeRequestError, match="temprature"):
        engine.generate("x", {"temprature": 0})
    with pytest.raises(ValueError, match="exactly one"):
        engine.generate()


def test_streaming_and_async(engine):
    full = engine.generate(PROMPTS[0], GREEDY)
    chunks = list(engine.generate(PROMPTS[0], GREEDY, stream=True))
    assert len(chunks) > 1
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # the text so far, as SGLang
    assert texts[-1] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    # a stream dropped early frees its request in the runtime
    it = engine.generate("Tell me a long story.", {"max_new_tokens": 2000, "ignore_eos": True},
                         stream=True)
    next(it)
    it.close()

    async def main():
        one = await engine.async_generate(PROMPTS[0], GREEDY)
        both = await asyncio.gather(engine.async_generate(PROMPTS[1], GREEDY),
                                    engine.async_generate(PROMPTS[2], GREEDY))
        streamed = [c async for c in await engine.async_generate(PROMPTS[0], GREEDY, stream=True)]
        return one, both, streamed

    one, both, streamed = asyncio.run(main())
    assert one["text"] == full["text"] and streamed[-1]["text"] == full["text"]
    assert [b["text"] for b in both] == [r["text"] for r in engine.generate(PROMPTS[1:], GREEDY)]
    info = engine.get_server_info()
    assert info["num_running_reqs"] == 0 and info["kv_held_by_running"] == 0


def test_same_greedy_output_as_the_frontend_runtime(engine, runtime_process):
    # the session's runtime runs with the same args; RuntimeEndpoint is sgl.Runtime's backend
    backend = sgl.RuntimeEndpoint(runtime_process.address, _is_alive=runtime_process.is_alive)

    @sgl.function
    def complete(s, prompt):
        s += prompt + sgl.gen("out", max_tokens=5, temperature=0)

    try:
        states = complete.run_batch([{"prompt": p} for p in PROMPTS], backend=backend)
    finally:
        backend.shutdown()
    ours = engine.generate(PROMPTS, GREEDY)
    assert [s["out"] for s in states] == [o["text"] for o in ours]


def test_runtime_generate_answers_as_sglangs_runtime(engine, runtime_process, embedded_tokenizer):
    """sgl.Runtime / RuntimeEndpoint.generate(prompt, sampling_params) returns SGLang's /generate
    response as a JSON string; input_ids and lists work as in the Engine; programs still run."""
    import json

    backend = sgl.RuntimeEndpoint(runtime_process.address, _is_alive=runtime_process.is_alive)
    try:
        one = json.loads(backend.generate(PROMPTS[0], GREEDY))
        assert one["text"] == engine.generate(PROMPTS[0], GREEDY)["text"]
        assert one["output_ids"] and one["meta_info"]["completion_tokens"] == len(one["output_ids"])
        ids = embedded_tokenizer.encode(PROMPTS[1])
        by_ids = json.loads(backend.generate(input_ids=[ids], sampling_params=GREEDY))
        assert [o["text"] for o in by_ids] == [engine.generate(input_ids=ids, sampling_params=GREEDY)["text"]]

        @sgl.function
        def complete(s):
            s += PROMPTS[0] + sgl.gen("out", max_tokens=5, temperature=0)

        assert complete.run(backend=backend)["out"] == one["text"]
    finally:
        backend.shutdown()
