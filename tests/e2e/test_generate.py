"""End-to-end generation on the embedded model, runtime in a separate process (shared fixture)."""

from sglite import protocol

GREEDY = {"temperature": 0, "max_new_tokens": 8}
SYSTEMS = [
    "You are a terse assistant. Answer in one short sentence. Never add explanations or lists. ",
    "The following is a list of facts about European geography, written for schoolchildren. ",
    "Translate the English words into French. Keep the answers short and lowercase please. ",
]
QUESTIONS = ["What is the capital of France?", "Name a large river.", "What is two plus two?",
             "Which ocean is largest?", "Say hello.", "Name a color.", "Count to three.",
             "What is ice?", "Name a fruit.", "What is the sun?", "Name a bird.", "Why is the sky blue?",
             "What do cows eat?", "Name a planet.", "What is rain?", "Name a month."]


def _prompts():
    shared = [s + "Question: " + q + "\nAnswer:" for s in SYSTEMS for q in QUESTIONS]
    unshared = [f"{i * 7 + 3} is a number, and {q.lower()}" for i, q in enumerate(QUESTIONS)]
    return shared + unshared  # 48 sharing one of three prefixes + 16 sharing nothing


def test_64_concurrent_requests_match_each_alone_and_pool_comes_back(client):
    prompts = _prompts()
    assert len(prompts) == 64
    alone = [client.generate(p, sampling_params=GREEDY) for p in prompts]
    assert all(r["error"] is None for r in alone)
    rids = []
    for p in prompts:
        rids.append(client.new_rid())
        client.send(protocol.GenerateReq(rid=rids[-1], text=p, sampling_params=GREEDY))
    together = client.collect(rids)
    for p, a, rid in zip(prompts, alone, rids):
        t = together[rid]
        assert t["error"] is None
        assert t["text"] == a["text"], f"batched output differs for {p!r}"
        assert t["meta_info"]["completion_tokens"] == a["meta_info"]["completion_tokens"]
        assert t["meta_info"]["finish_reason"] == a["meta_info"]["finish_reason"]
    info = client.info()
    assert info["num_running_reqs"] == 0 and info["kv_held_by_running"] == 0
    assert info["max_running_requests"] == 96 and info["cuda_graph_max_bs"] is None  # CPU: no graphs
    assert info["cache_hit_rate"] > 0.3  # 48 prompts share long prefixes
    assert client.request(protocol.FlushCacheReq(rid="flush")).rid == "flush"
    info = client.info()
    assert info["kv_free"] == info["kv_total"], info
    assert info["kv_evictable"] == 0 and info["kv_protected"] == 0


def test_streaming_deltas_add_up_to_the_full_text(client):
    full = client.generate("The capital of France is", sampling_params=GREEDY)
    streamed = client.generate("The capital of France is", sampling_params=GREEDY, stream=True)
    assert len(streamed["chunks"]) > 1
    assert "".join(streamed["chunks"]) == full["text"]
    meta = streamed["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "matched": None}
    assert meta["prompt_tokens"] == full["meta_info"]["prompt_tokens"]


def test_stop_string_is_cut_and_reported(client):
    base = client.generate("The capital of France is", sampling_params=GREEDY)["text"]
    word = base.split()[0]  # the first word the model writes
    r = client.generate("The capital of France is", sampling_params={**GREEDY, "stop": [word]},
                        stream=True)
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
    assert word not in r["text"] and r["text"] == base[: base.index(word)]


def test_multi_turn_chat_reuses_prompt_and_answer(client):
    turn1 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    r1 = client.generate(turn1, sampling_params={"temperature": 0, "max_new_tokens": 12})
    m1 = r1["meta_info"]
    turn2 = turn1 + r1["text"] + "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
    r2 = client.generate(turn2 + "<|im_start|>assistant\n", sampling_params=GREEDY)
    # everything of turn 1 but its last sampled token (never forwarded, so it has no KV)
    assert r2["meta_info"]["cached_tokens"] >= m1["prompt_tokens"] + m1["completion_tokens"] - 1


def test_logprobs_input_output_and_top_k(client):
    r = client.generate("The capital of France is", sampling_params={**GREEDY, "max_new_tokens": 4},
                        return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    meta = r["meta_info"]
    inp, out = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] and inp[0][0] is None
    assert all(lp <= 0 for lp, _, _ in inp[1:])
    assert len(out) == 4 and len(meta["output_top_logprobs"]) == 4
    for (lp, tok, _), top in zip(out, meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == tok and abs(top[0][0] - lp) < 1e-5  # greedy = top-1
    assert "".join(t for _, _, t in out) == r["text"]


def test_abort_frees_the_requests_kv(client):
    rid = client.new_rid()
    client.send(protocol.GenerateReq(rid=rid, text="Tell me a long story about a dragon.",
                                     sampling_params={"max_new_tokens": 2000, "ignore_eos": True},
                                     stream=True))
    first = client.recv()
    assert first.rid == rid and not first.finished
    client.send(protocol.AbortReq(rid=rid))
    while True:
        reply = client.recv()
        if reply.finished:
            break
    assert reply.meta_info["finish_reason"]["type"] == "abort"
    info = client.info()
    assert info["num_running_reqs"] == 0 and info["kv_held_by_running"] == 0
    assert info["max_running_requests"] == 96 and info["cuda_graph_max_bs"] is None  # CPU: no graphs


def test_input_logprobs_from_a_start_equal_the_full_run(client):
    """Only the rows from logprob_start_len on go through the LM head (and the prefix before it
    may come from the radix cache): the values equal those of a run that scores every token."""
    text = "The quick brown fox jumps over the lazy dog because it wanted to see the river."
    params = {**GREEDY, "max_new_tokens": 2}
    full = client.generate(text, sampling_params=params, return_logprob=True, logprob_start_len=0,
                           top_logprobs_num=2)["meta_info"]
    part = client.generate(text, sampling_params=params, return_logprob=True, logprob_start_len=6,
                           top_logprobs_num=2)["meta_info"]
    assert len(part["input_token_logprobs"]) == full["prompt_tokens"] - 6
    for (a, ta, _), (b, tb, _) in zip(full["input_token_logprobs"][6:], part["input_token_logprobs"]):
        assert ta == tb and abs(a - b) < 1e-4
    for a, b in zip(full["input_top_logprobs"][6:], part["input_top_logprobs"]):
        assert [t for _, t, _ in a] == [t for _, t, _ in b]
    assert part["output_token_logprobs"][0][1] == full["output_token_logprobs"][0][1]
