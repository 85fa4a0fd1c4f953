"""select scoring (ScoreReq), whole-program graphs (GraphReq) and constrained generation."""

import math

from sglite import choices, protocol

PROMPT = "Q: What is the capital of France?\nA: The capital of France is"


def test_score_returns_aligned_logprobs_per_choice(client):
    out = client.request(protocol.ScoreReq(rid=client.new_rid(), text=PROMPT,
                                           choices=[" Paris", " Berlin", " a city"],
                                           unconditional=True))
    assert isinstance(out, protocol.ScoreOut), out
    assert len(out.token_logprobs) == 3
    for lps, ids, texts, unc in zip(out.token_logprobs, out.token_ids, out.token_texts,
                                    out.unconditional_token_logprobs):
        assert len(lps) == len(ids) == len(texts) == len(unc) >= 2  # boundary token + choice
        assert all(lp <= 0 and math.isfinite(lp) for lp in lps)
    decision = choices.decide("token_length_normalized", prefix_text=PROMPT,
                              choices=[" Paris", " Berlin", " a city"],
                              token_logprobs=out.token_logprobs, token_ids=out.token_ids,
                              token_texts=out.token_texts)
    assert decision.decision == " Paris"
    meta = out.meta_info
    assert 0 < meta["cached_tokens"] <= meta["prompt_tokens"]  # choices reuse the prefilled prefix


def test_graph_runs_gen_select_and_fork_inside_the_runtime(client):
    gen = {"temperature": 0, "max_new_tokens": 6, "stop": ["\n"]}
    nodes = [
        protocol.GraphNode(id=0, kind="text", parent=None, text=PROMPT),
        protocol.GraphNode(id=1, kind="select", parent=0, name="city",
                           choices=[" Paris", " Berlin"]),
        protocol.GraphNode(id=2, kind="text", parent=1, text=".\nQ: And of Italy?\nA:"),
        protocol.GraphNode(id=3, kind="gen", parent=2, name="a", sampling_params=gen),
        protocol.GraphNode(id=4, kind="gen", parent=2, name="b",
                           sampling_params={**gen, "max_new_tokens": 3}),
    ]
    rid = client.new_rid()
    client.send(protocol.GraphReq(rid=rid, nodes=nodes))
    outs = {}
    while True:
        reply = client.recv()
        assert not isinstance(reply, protocol.ErrorOut), reply.message
        if isinstance(reply, protocol.GraphDone):
            break
        outs[reply.node_id] = reply
    assert set(outs) == {1, 3, 4} and outs[1].text == " Paris"
    # both fork branches are greedy over the same prompt: b is a prefix of a
    assert outs[3].text.startswith(outs[4].text)
    alone = client.generate(PROMPT + " Paris.\nQ: And of Italy?\nA:", sampling_params=gen)
    assert alone["text"] == outs[3].text
    assert alone["meta_info"]["cached_tokens"] > 20  # the graph left its KV in the tree


def test_graph_with_a_bad_node_reports_that_node(client):
    nodes = [protocol.GraphNode(id=0, kind="text", parent=None, text="Hi"),
             protocol.GraphNode(id=1, kind="gen", parent=0, sampling_params={"bogus": 1})]
    reply = client.request(protocol.GraphReq(rid=client.new_rid(), nodes=nodes))
    assert isinstance(reply, protocol.ErrorOut) and "bogus" in reply.message


def test_regex_constrained_generation(client):
    r = client.generate("The year the first man walked on the moon:",
                        sampling_params={"temperature": 0, "max_new_tokens": 8,
                                         "regex": r" [0-9]{4}"})
    assert r["error"] is None
    assert len(r["text"]) == 5 and r["text"][1:].isdigit(), r["text"]
    assert r["meta_info"]["finish_reason"]["type"] == "stop"
