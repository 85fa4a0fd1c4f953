"""SGLang's frontend names that need the runtime (issue 16), and the run_batch half of issue 20's
lone-surrogate defect, against the embedded SmolLM2-135M."""

import json
import re

import sglite as sgl
from sglite.lang import ir
from sglite.runtime.sampling.detokenizer import StopMatcher


def test_stop_matcher_regex_ends_at_the_earliest_match_end():
    m = StopMatcher(["END"], [r"\d+\."])
    fed = [m.feed(t) for t in ["The ", "answer is 4", "2", ". More", " text"]]
    assert fed == [("The ", None), ("answer is 4", None), ("2", None), (".", r"\d+\."),
                   ("", r"\d+\.")]
    m = StopMatcher([], [r"a+b"])  # the match starts in text already released
    assert [m.feed("aa"), m.feed("abz")] == [("aa", None), ("ab", "a+b")]
    m = StopMatcher(["x."], [r"\d"])  # a stop string that ends first wins (and is cut)
    assert [m.feed("ax"), m.feed(".1")] == [("a", None), ("", "x.")]


def test_stop_regex_on_the_runtime(default_backend):
    @sgl.function
    def prog(s, stop_regex):
        s += "Write a sentence about the sea:" + sgl.gen(
            "out", max_tokens=24, temperature=0, ignore_eos=True, stop_regex=stop_regex)

    free, cut = prog.run_batch([{"stop_regex": None}, {"stop_regex": r"[aeiou][a-z]"}])
    assert free.error() is None and cut.error() is None, (free.error(), cut.error())
    out = cut["out"]
    assert re.search(r"[aeiou][a-z]", out) and not re.search(r"[aeiou][a-z]", out[:-1]), out
    assert free["out"].startswith(out)  # greedy: the same text, ended at the first match
    assert cut.get_meta_info("out")["finish_reason"] == {"type": "stop", "matched": "[aeiou][a-z]"}


def test_return_text_in_logprobs_and_gen_n(default_backend):
    @sgl.function
    def prog(s):
        s += "The sky is" + sgl.gen("plain", max_tokens=3, temperature=0, return_logprob=True)
        s += sgl.gen("texts", max_tokens=3, temperature=0, return_logprob=True,
                     return_text_in_logprobs=True)
        s += "\nTwo tries:" + sgl.gen("two", n=2, max_tokens=6, temperature=1.0)

    state = prog.run()
    plain = state.get_meta_info("plain")["output_token_logprobs"]
    texts = state.get_meta_info("texts")["output_token_logprobs"]
    assert plain and all(e[2] is None and isinstance(e[1], int) for e in plain)  # SGLang's shape
    assert texts and all(isinstance(e[2], str) for e in texts)
    two = state["two"]
    assert isinstance(two, list) and len(two) == 2 and all(isinstance(t, str) for t in two)
    assert state.text().endswith("Two tries:" + two[0])
    metas = state.get_meta_info("two")
    assert len(metas) == 2 and all(1 <= m["completion_tokens"] <= 6 for m in metas)


def test_gen_string_is_json_and_gen_int_stops(default_backend):
    @sgl.function
    def prog(s):
        s += 'City: {"name": ' + sgl.gen_string("name", max_tokens=12) + ', "population": '
        s += sgl.gen_int("pop", max_tokens=8) + "}"

    state = prog.run(temperature=0)
    assert state.error() is None, state.error()
    name_meta = state.get_meta_info("name")
    if name_meta["finish_reason"]["type"] == "stop":
        assert re.fullmatch(ir.REGEX_STR, state["name"]) and isinstance(json.loads(state["name"]),
                                                                         str)
    assert re.fullmatch(ir.REGEX_INT, state["pop"]) and int(state["pop"]) is not None


def test_run_batch_keeps_the_other_results_when_one_text_has_a_lone_surrogate(default_backend):
    @sgl.function
    def prog(s, word):
        s += "Say " + word + ":" + sgl.gen("a", max_tokens=2, temperature=0)

    states = prog.run_batch([{"word": "hi"}, {"word": "bad \ud800 half"}, {"word": "yo"}])
    assert states[0].error() is None and states[2].error() is None
    assert states[0]["a"] and states[2]["a"]
    assert "lone surrogate" in str(states[1].error()) and "character 8" in str(states[1].error())
