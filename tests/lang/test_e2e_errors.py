"""Errors inside programs reach the caller; the rest of a batch still finishes."""

import pytest

import sglite as sgl


@sgl.function
def with_grammar(s, grammar, fail_in_python=False):
    s += "Say yes or no: " + sgl.gen("a", max_tokens=3, grammar=grammar)
    if fail_in_python:
        raise ValueError("boom in the program body")
    s += "\nAgain: " + sgl.gen("b", max_tokens=2)


GOOD = 'start: "yes" | "no"'
BAD = 'start: "yes" | ('  # runtime-side: the grammar compiler rejects it (ErrorOut)


def test_runtime_error_reaches_eager_caller(endpoint):
    state = with_grammar.run(BAD, backend=endpoint, temperature=0)
    with pytest.raises(RuntimeError, match="grammar"):
        state["a"]
    assert isinstance(state.error(), sgl.RuntimeRequestError)


def test_errors_in_batch_do_not_stop_the_others(endpoint):
    args = [{"grammar": GOOD}, {"grammar": BAD}, {"grammar": GOOD, "fail_in_python": True},
            {"grammar": GOOD}]
    states = with_grammar.run_batch(args, backend=endpoint, temperature=0)
    assert "grammar" in str(states[1].error()).lower()
    with pytest.raises(RuntimeError):
        states[1]["b"]
    assert "boom" in str(states[2].error()) and states[2]["a"] in ("yes", "no")
    for state in (states[0], states[3]):
        assert state.error() is None and state["a"] in ("yes", "no") and "b" in state
