"""SGLang's three choice methods on hand-made logprobs (model-free)."""

import math

import pytest

from sglite.choices import (decide, get_choices_method, greedy_token_selection,
                            token_length_normalized, unconditional_likelihood_normalized)


def toks(*lps):
    return [(lp, i, f"t{i}") for i, lp in enumerate(lps)]


def call(method, choices, input_lps, uncond=None):
    normalized = [sum(t[0] for t in row) / len(row) for row in input_lps]
    return method(choices=choices, normalized_prompt_logprobs=normalized,
                  input_token_logprobs=input_lps, output_token_logprobs=[[] for _ in choices],
                  unconditional_token_logprobs=uncond)


def test_token_length_normalized_picks_best_mean_and_first_on_ties():
    d = call(token_length_normalized, ["Paris", "Antidis"], [toks(-1.0), toks(-0.2, -0.2, -0.2)])
    assert d.decision == "Antidis"  # the long-choice bias SGLang users report (#523)
    assert d.meta_info["normalized_prompt_logprobs"] == pytest.approx([-1.0, -0.2])
    assert call(token_length_normalized, ["a", "b"], [toks(-1.0), toks(-1.0)]).decision == "a"


def test_greedy_token_selection_eliminates_token_by_token():
    # First tokens tie between a and b; at token 2 "b" (-0.5) beats "a" (-3.0), although "a" has
    # the better mean (which token_length_normalized picks). "c" is short and gets padded.
    rows = [toks(-0.1, -3.0, -0.1), toks(-0.1, -0.5, -9.0), toks(-2.0)]
    d = call(greedy_token_selection, ["a", "b", "c"], rows)
    assert d.decision == "b"
    matrix = d.meta_info["greedy_logprob_matrix"]
    assert matrix[2] == [-2.0, -2.0, -2.0]  # padded with its own average
    assert call(token_length_normalized, ["a", "b", "c"], rows).decision == "a"


def test_unconditional_likelihood_normalized_subtracts_prior():
    # "yes" is likely anyway (unconditional -0.1); "paris" is what the context made likely.
    cond = [toks(-0.5, -0.5), toks(-0.6, -0.6)]
    uncond = [toks(None, -0.1), toks(None, -3.0)]
    d = call(unconditional_likelihood_normalized, ["yes", "paris"], cond, uncond)
    assert d.decision == "paris"
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([-0.45, 0.9])
    with pytest.raises(ValueError, match="unconditional"):
        call(unconditional_likelihood_normalized, ["a"], [toks(-1.0)])


def test_decide_drops_boundary_token_only_without_healing():
    prefix = "Answer:"
    d = decide("token_length_normalized", prefix_text=prefix, choices=[" yes", "no"],
               token_logprobs=[[-5.0, -0.2], [-0.3, -0.4]], token_ids=[[1, 2], [3, 4]],
               token_texts=[[":", " yes"], [":no", "!"]])
    # " yes": boundary ":" belongs to the prefix -> dropped; "no": ":no" fused (healing) -> kept
    assert [len(r) for r in d.meta_info["input_token_logprobs"]] == [1, 2]
    assert d.meta_info["normalized_prompt_logprobs"] == pytest.approx([-0.2, -0.35])
    assert d.decision == " yes"


def test_get_choices_method_by_name_and_errors():
    assert get_choices_method("greedy_token_selection") is greedy_token_selection
    with pytest.raises(ValueError, match="unknown choices_method"):
        get_choices_method("best")
    assert not math.isnan(call(token_length_normalized, ["x"], [toks(-1.0)]).meta_info[
        "normalized_prompt_logprobs"][0])
