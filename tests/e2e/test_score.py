"""select scoring (ScoreReq) and constrained generation."""

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


def test_regex_constrained_generation(client):
    r = client.generate("The year the first man walked on the moon:",
                        sampling_params={"temperature": 0, "max_new_tokens": 8,
                                         "regex": r" [0-9]{4}"})
    assert r["error"] is None
    assert len(r["text"]) == 5 and r["text"][1:].isdigit(), r["text"]
    assert r["meta_info"]["finish_reason"]["type"] == "stop"
