"""The OpenAI API through the official `openai` client against the live HTTP front (conftest.py),
on the embedded SmolLM2: chat, streams (and their SSE bytes), JSON schema output, tool calls,
completions with logprobs, n=2, auth, errors, a disconnect that must free KV, 64 clients."""

import asyncio
import json
import time

import jsonschema
import openai
import pytest

API_KEY = "sk-sglite-test"  # the key tests/http/conftest.py starts the server with

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FRANCE = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def _events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its `data:` payloads, checking the framing byte by byte."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b""  # every event ends with a blank line
    out = []
    for b in blocks[:-1]:
        assert b.startswith(b"data: ") and b"\n" not in b, b  # one data line per event
        out.append(b[len(b"data: "):])
    assert out[-1] == b"[DONE]" and b"[DONE]" not in out[:-1]
    return out[:-1]


def test_chat_answers_with_the_models_own_template(oai, http, embedded_tokenizer):
    r = oai.chat.completions.create(model="any", messages=FRANCE, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    # the prompt was rendered with the model's template, as transformers renders it
    ids = embedded_tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same prompt through the native route gives the same greedy text
    text = embedded_tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True,
                                                  tokenize=False)
    native = http.post("/generate", json={"text": text, "sampling_params": {
        "max_new_tokens": 16, "temperature": 0}}).json()
    assert native["text"] == choice.message.content
    # a second identical request reads its prompt from the radix cache
    again = oai.chat.completions.create(model="any", messages=FRANCE, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= len(ids) - 1


def test_chat_stream_sse_bytes_and_usage(oai, http):
    body = {"model": "m", "messages": FRANCE, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read()
    chunks = [json.loads(e) for e in _events(raw)]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content_chunks, usage_chunk = chunks
    assert all(c["usage"] is None for c in content_chunks)  # include_usage: null until the end
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    finishes = [c["choices"][0]["finish_reason"] for c in content_chunks]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    full = oai.chat.completions.create(model="m", messages=FRANCE, max_tokens=12, temperature=0)
    assert streamed == full.choices[0].message.content
    assert usage_chunk["usage"]["completion_tokens"] == full.usage.completion_tokens
    assert len(content_chunks) > 3  # really streamed, not one chunk at the end
    # the openai client reads the same stream
    parts = oai.chat.completions.create(model="m", messages=FRANCE, max_tokens=12, temperature=0,
                                        stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == streamed


def test_json_schema_response_format_validates(oai):
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["city", "population_millions"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model="m", messages=[SYSTEM, {"role": "user", "content": "Describe Paris in JSON."}],
        max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = oai.chat.completions.create(model="m", messages=FRANCE, max_tokens=8, temperature=0,
                                    response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")  # an object, cut at 8 tokens


def test_forced_tool_choice_is_parsed_into_tool_calls(oai):
    msgs = [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.chat.completions.create(
        model="m", messages=msgs, tools=[WEATHER], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # "required": any of the tools, as a list of calls
    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    r = oai.chat.completions.create(model="m", messages=msgs, tools=[WEATHER, other],
                                    tool_choice="required", max_tokens=60, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    for c in calls:
        assert c.function.name in ("get_weather", "get_time")
        json.loads(c.function.arguments)
    # streamed: the call arrives as a tool_calls delta, no content
    parts = list(oai.chat.completions.create(
        model="m", messages=msgs, tools=[WEATHER], max_tokens=40, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [p.choices[0].delta for p in parts if p.choices]
    streamed_calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert [tc.function.name for tc in streamed_calls] == ["get_weather"]
    assert streamed_calls[0].function.arguments == choice.message.tool_calls[0].function.arguments
    assert parts[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(d.content or "" for d in deltas)


def test_auto_tool_choice_parses_the_models_hermes_text(oai):
    # the embedded model speaks ChatML, so the server picked the Hermes/Qwen parser; SGLang's
    # `regex` extension makes the model write a call in that format, which must come back parsed
    forced_text = r'Checking\.<tool_call>\n\{"name": "get_weather", "arguments": \{"city": ' \
                  r'"Paris", "unit": "celsius"\}\}\n</tool_call>'
    kw = dict(model="m", messages=[SYSTEM, {"role": "user", "content": "Weather in Paris?"}],
              tools=[WEATHER], max_tokens=60, temperature=0, extra_body={"regex": forced_text})
    r = oai.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    parts = list(oai.chat.completions.create(**kw, stream=True))
    deltas = [p.choices[0].delta for p in parts if p.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking."  # the markup never leaks
    (tc,) = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert json.loads(tc.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # tool_choice "none": the text stays text
    r = oai.chat.completions.create(**kw, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content


def test_completions_with_logprobs(oai):
    r = oai.completions.create(model="m", prompt="The capital of France is", max_tokens=6,
                               temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == r.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        # greedy: the chosen token is the most likely one
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)
    # echo, a list of prompts and token-id prompts
    r = oai.completions.create(model="m", prompt=["Hello", "One, two,"], max_tokens=3,
                               temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("Hello") and r.choices[1].text.startswith("One, two,")


def test_n_equals_two(oai):
    r = oai.chat.completions.create(model="m", messages=FRANCE, max_tokens=5, n=2,
                                    temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    again = oai.chat.completions.create(model="m", messages=FRANCE, max_tokens=5, n=2,
                                        temperature=1.0, seed=7)
    # seeded: the same two answers again, and the two choices are sampled with their own seeds
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    c = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=6, n=2,
                               temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert len(c.choices) == 2 and c.choices[0].text != c.choices[1].text
    assert c.usage.completion_tokens == 12 and c.usage.prompt_tokens == 4  # prompt counted once


def test_wrong_api_key_is_401(http_server, http):
    bad = openai.OpenAI(base_url=http_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="m", messages=FRANCE, max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    import httpx

    assert httpx.get(http_server.url + "/health").status_code == 200  # /health needs no key
    for path in ("/metrics", "/get_server_info", "/v1/models"):
        assert httpx.get(http_server.url + path).status_code == 401
    assert http.get("/v1/models").json()["data"][0]["object"] == "model"


def test_malformed_bodies_get_openai_errors(http, oai):
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "m"}).encode(), 400, "messages"),
        (json.dumps({"model": "m", "messages": FRANCE, "temperature": 9}).encode(), 400,
         "temperature"),
        (json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]}).encode(),
         400, "messages.0.role"),
        (json.dumps({"model": "m", "messages": FRANCE, "n": 0}).encode(), 400, "n"),
    ]
    for raw, status, param in cases:
        r = http.post("/v1/chat/completions", content=raw,
                      headers={"content-type": "application/json"})
        assert r.status_code == status, (raw, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["code"] == status
    # a prompt past the context length: the runtime's refusal becomes a 400
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="m", prompt=[1] * 9000, max_tokens=2)
    assert e.value.status_code == 400 and "9000" in e.value.body["message"]  # names the length
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="m", messages=FRANCE, tools=[WEATHER],
                                    tool_choice={"type": "function",
                                                 "function": {"name": "nope"}})
    r = http.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_metrics_parse_and_count(http):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}
        return fams

    before = scrape()
    http.post("/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 5, "stream": True,
                                            "temperature": 0}).read()
    after = scrape()

    def value(fams, name, suffix=""):
        return sum(s.value for s in fams[name].samples if s.name == name + suffix)

    for name in ("sglite:requests", "sglite:prompt_tokens", "sglite:generation_tokens"):
        assert value(after, name, "_total") > value(before, name, "_total"), name
    for name in ("sglite:time_to_first_token_seconds", "sglite:inter_token_latency_seconds",
                 "sglite:e2e_request_latency_seconds"):
        assert after[name].type == "histogram"
        assert value(after, name, "_count") > value(before, name, "_count"), name
    for name in ("sglite:num_running_reqs", "sglite:num_queue_reqs", "sglite:token_usage",
                 "sglite:cache_hit_rate", "sglite:max_total_num_tokens"):
        assert after[name].type == "gauge", name
    assert value(after, "sglite:max_total_num_tokens") == 8192
    assert "sglite:cached_tokens" in after


def _wait_idle(http, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/get_server_info").json()
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


def test_client_disconnect_mid_stream_frees_the_kv(http_server, http):
    import httpx

    _wait_idle(http)
    assert http.post("/flush_cache").status_code == 200
    before = http.get("/get_server_info").json()
    assert before["kv_free"] == before["kv_total"]
    body = {"model": "m", "prompt": "Write a very long story about a dragon.", "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    with httpx.Client(base_url=http_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events (with their blank lines)
    assert any(g.startswith("data: ") for g in got)
    info = _wait_idle(http)
    # aborted, not run to its 2000 tokens (a few seconds at most here, minutes if it ran on)
    assert time.monotonic() - t0 < 30
    assert info["kv_held_by_running"] == 0
    assert http.post("/flush_cache").status_code == 200
    after = http.get("/get_server_info").json()
    assert after["kv_free"] == after["kv_total"] == before["kv_total"]
    assert after["kv_evictable"] == 0 and after["kv_protected"] == 0


def test_64_concurrent_http_clients_are_all_answered(http_server, oai):
    prompts = [f"{i}, {i + 1}, {i + 2}," for i in range(64)]  # every one continues with text

    async def main():
        async with openai.AsyncOpenAI(base_url=http_server.url + "/v1", api_key=API_KEY,
                                      max_retries=0, timeout=300) as aoai:
            async def one(i):
                if i % 2:
                    return (await aoai.completions.create(
                        model="m", prompt=prompts[i], max_tokens=4, temperature=0)).choices[0].text
                stream = await aoai.completions.create(model="m", prompt=prompts[i],
                                                       max_tokens=4, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices]) or None
            return await asyncio.gather(*(one(i) for i in range(64)))

    texts = asyncio.run(main())
    assert len(texts) == 64 and all(texts), texts
    # batched greedy answers equal the same requests one at a time (spot checks)
    for i in (0, 1, 37):
        alone = oai.completions.create(model="m", prompt=prompts[i], max_tokens=4, temperature=0)
        assert alone.choices[0].text == texts[i]


def test_streamed_logprobs_come_with_their_chunks(oai):
    """As OpenAI streams them: each chunk carries the logprobs of the tokens that arrived since
    the last one, and together they cover the whole output once."""
    chunks = list(oai.completions.create(model="m", prompt="The capital of France is",
                                         max_tokens=8, temperature=0, logprobs=2, stream=True,
                                         stream_options={"include_usage": True}))
    with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs
               and c.choices[0].logprobs.tokens]
    assert len(with_lp) >= 2
    tokens = [t for c in with_lp for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in with_lp for o in c.choices[0].logprobs.text_offset]
    assert len(tokens) == chunks[-1].usage.completion_tokens
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    chat = list(oai.chat.completions.create(model="m", messages=FRANCE, max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True, stream_options={"include_usage": True}))
    entries = [e for c in chat if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert sum(bool(c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content)
               for c in chat) >= 2
    assert len(entries) == chat[-1].usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
