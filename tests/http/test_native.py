"""SGLang's native routes on the live HTTP front: /generate (text or input_ids, one or a list,
streamed), /health, /health_generate, /get_model_info, /get_server_info, /flush_cache,
/abort_request."""

import json
import threading
import time

GREEDY = {"max_new_tokens": 6, "temperature": 0}


def _sse(resp) -> list[dict]:
    raw = resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    blocks = raw.split(b"\n\n")[:-1]
    assert all(b.startswith(b"data: ") for b in blocks)
    events = [b[len(b"data: "):] for b in blocks]
    return [json.loads(e) for e in events[:-1]]


def test_generate_text_ids_lists_and_stream(http, embedded_tokenizer):
    one = http.post("/generate", json={"text": "The capital of France is",
                                       "sampling_params": GREEDY}).json()
    assert one["text"] and one["meta_info"]["completion_tokens"] == 6
    assert one["meta_info"]["finish_reason"] == {"type": "length", "matched": None}
    ids = embedded_tokenizer("The capital of France is").input_ids
    by_ids = http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert by_ids["text"] == one["text"] and by_ids["meta_info"]["prompt_tokens"] == len(ids)
    batch = http.post("/generate", json={
        "text": ["The capital of France is", "One, two, three,"],
        "sampling_params": [GREEDY, {"max_new_tokens": 3, "temperature": 0}]}).json()
    assert isinstance(batch, list) and batch[0]["text"] == one["text"]
    assert batch[1]["meta_info"]["completion_tokens"] == 3
    ids_batch = http.post("/generate", json={"input_ids": [ids, ids[:3]],
                                             "sampling_params": GREEDY}).json()
    assert ids_batch[0]["text"] == one["text"] and len(ids_batch) == 2
    # logprobs bring the output token ids
    lp = http.post("/generate", json={"text": "The capital of France is", "return_logprob": True,
                                      "top_logprobs_num": 2, "sampling_params": GREEDY}).json()
    assert embedded_tokenizer.decode(lp["output_ids"]) == one["text"]
    assert len(lp["meta_info"]["output_top_logprobs"][0]) == 2
    # streamed: each event carries the text so far (as SGLang's /generate does)
    with http.stream("POST", "/generate", json={"text": "The capital of France is", "stream": True,
                                                "sampling_params": GREEDY}) as resp:
        events = _sse(resp)
    texts = [e["text"] for e in events]
    assert texts[-1] == one["text"] and len(events) > 1
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_errors(http):
    r = http.post("/generate", json={"sampling_params": GREEDY})
    assert r.status_code == 400 and "exactly one of text or input_ids" in r.json()["error"]["message"]
    r = http.post("/generate", json={"text": "x", "sampling_params": {"temprature": 0}})
    assert r.status_code == 400 and "temprature" in r.json()["error"]["message"]
    r = http.post("/generate", json={"input_ids": [10 ** 9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_health_info_and_flush(http, http_server):
    import httpx

    assert httpx.get(http_server.url + "/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    model = http.get("/get_model_info").json()
    assert model["is_generation"] is True and "SmolLM2" in model["model_path"]
    info = http.get("/get_server_info").json()
    assert info["max_total_tokens"] == 8192 and info["api_key_required"] is True
    assert info["tool_call_parser"] == "hermes" and "kv_free" in info
    r = http.post("/flush_cache")
    assert r.status_code == 200 and "flushed" in r.text.lower()
    assert http.get("/flush_cache").status_code == 200
    info = http.get("/get_server_info").json()
    assert info["kv_free"] == info["kv_total"]


def test_answered_requests_leave_nothing_behind_in_the_front(http, oai):
    """Whole (non-streamed) answers end their requests in the front too: their reply routes are
    forgotten and a user rid released (they once stayed registered for good, one per request)."""
    before = http.get("/get_server_info").json()["http_requests_in_flight"]
    sp = {"max_new_tokens": 2, "temperature": 0}
    assert http.post("/generate", json={"text": "Hi", "rid": "whole-1", "sampling_params": sp}).status_code == 200
    assert http.post("/generate", json={"text": ["a", "b"], "sampling_params": sp}).status_code == 200
    oai.completions.create(model="m", prompt="Hi", max_tokens=2, n=2)
    oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert http.get("/get_server_info").json()["http_requests_in_flight"] == before
    assert http.post("/abort_request", json={"rid": "whole-1"}).json() == {"aborted": 0}


def test_abort_request_by_rid(http):
    result = {}

    def run():
        with http.stream("POST", "/generate", json={
                "text": "Tell me a long story.", "rid": "user-story-1", "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True,
                                    "temperature": 0}}) as resp:
            result["events"] = _sse(resp)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while http.get("/get_server_info").json()["num_running_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http.post("/abort_request", json={"rid": "user-story-1"}).json() == {"aborted": 1}
    t.join(60)
    assert not t.is_alive()
    last = result["events"][-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["id"] == "user-story-1"
    assert last["meta_info"]["completion_tokens"] < 2000
    assert http.post("/abort_request", json={}).status_code == 400
