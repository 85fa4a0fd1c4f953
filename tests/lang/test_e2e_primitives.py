"""Every primitive and state method against the embedded SmolLM2-135M in a runtime process."""

import asyncio
import json
import re

import pydantic

import sglite as sgl
from sglite.lang import ir

SYSTEM = "You are a helpful assistant."


@sgl.function
def capital(s, country):
    s += sgl.system(SYSTEM)
    s += sgl.user("What is the capital of " + country + "?")
    s += sgl.assistant(sgl.gen("answer", max_tokens=12))


def test_gen_roles_text_messages_meta(default_backend):
    state = capital.run("France", temperature=0)
    assert "Paris" in state["answer"]
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert state.text().endswith(state["answer"] + "<|im_end|>\n")
    assert state.messages() == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "What is the capital of France?"},
                                {"role": "assistant", "content": state["answer"]}]
    meta = state.get_meta_info("answer")
    assert meta["prompt_tokens"] > 10 and 0 < meta["completion_tokens"] <= 12
    assert meta["finish_reason"]["type"] in ("stop", "length") and "cached_tokens" in meta
    assert state.error() is None and state.ret_value is None
    state["note"] = "mine"
    assert state["note"] == "mine" and "note" in state


def test_default_system_prompt_of_the_model_is_kept(default_backend):
    @sgl.function
    def no_system(s):
        with s.user():
            s += "Hi"
        s += sgl.assistant_begin() + sgl.gen("a", max_tokens=2) + sgl.assistant_end()

    state = no_system.run(temperature=0)
    assert state.text().startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert state.messages()[0]["role"] == "system" and state.messages()[1]["content"] == "Hi"


def test_sampling_knobs_and_precedence(default_backend):
    @sgl.function
    def knobs(s):
        s += "Count: 1, 2, 3," + sgl.gen("stopped", max_tokens=16, stop=",")
        s += "\nWords:" + sgl.gen("capped", max_tokens=3, temperature=0.7, top_p=0.9, top_k=20,
                                   min_p=0.05, frequency_penalty=0.5, presence_penalty=0.5)
        s += "\nMore:" + sgl.gen("min", max_tokens=4, min_tokens=4, ignore_eos=True)
        s += "\nIds:" + sgl.gen("lp", max_tokens=2, return_logprob=True, top_logprobs_num=2,
                                 logprob_start_len=0, stop_token_ids=[2])

    state = knobs.run(temperature=0, max_new_tokens=2)  # the gen arguments above override these
    assert state.error() is None, state.error()
    assert "," not in state["stopped"] and state.get_meta_info("stopped")["completion_tokens"] <= 16
    assert state.get_meta_info("capped")["completion_tokens"] <= 3
    assert state.get_meta_info("min")["completion_tokens"] == 4
    lp = state.get_meta_info("lp")
    assert len(lp["output_token_logprobs"]) == lp["completion_tokens"]
    assert len(lp["input_token_logprobs"]) > 0 and len(lp["output_top_logprobs"][0]) == 2


def test_constrained_gen(default_backend):
    class City(pydantic.BaseModel):
        name: str
        population: int

    @sgl.function
    def constrained(s):
        s += "Paris has 2 million people. As JSON: " + sgl.gen("js", max_tokens=24,
                                                               json_schema=City)
        s += "\nA number: " + sgl.gen_int("n", max_tokens=4)
        s += "\nA float: " + sgl.gen("f", max_tokens=6, dtype=float)
        s += "\nTrue or False: " + sgl.gen("b", max_tokens=3, dtype=bool)
        s += "\nA word in quotes: " + sgl.gen_string("w", max_tokens=8)
        s += "\nPhone: " + sgl.gen("phone", regex=r"[0-9]{3}-[0-9]{2}")
        s += "\nAnswer: " + sgl.gen("g", max_tokens=4, grammar='start: "yes" | "no"')

    state = constrained.run(temperature=0)
    assert state.error() is None, state.error()
    if state.get_meta_info("js")["finish_reason"]["type"] == "stop":
        City.model_validate_json(state["js"])
    else:  # cut by max_tokens: still a prefix of schema-valid JSON
        assert state["js"].startswith("{")
    for name, regex in [("n", ir.REGEX_INT), ("phone", r"[0-9]{3}-[0-9]{2}"),
                        ("b", ir.REGEX_BOOL)]:
        assert re.fullmatch(regex, state[name]), (name, state[name])
    assert re.fullmatch(r"[-+]?[0-9]*\.?[0-9]*([eE][-+]?[0-9]*)?", state["f"])
    assert state["w"].startswith('"') and state["g"] in ("yes", "no")


def test_select_methods_and_gen_choices(default_backend):
    @sgl.function
    def pick(s, method):
        s += "The capital of France is"
        s += sgl.select("city", [" Paris", " London", " a banana"], choices_method=method)
        s += ". Is that right? Answer:" + sgl.gen("yn", choices=[" yes", " no"])

    for method in (sgl.token_length_normalized, sgl.greedy_token_selection,
                   sgl.unconditional_likelihood_normalized):
        state = pick.run(method)
        assert state["city"] == " Paris", (method, state.get_meta_info("city"))
        meta = state.get_meta_info("city")
        assert len(meta["normalized_prompt_logprobs"]) == 3
        assert all(len(row) >= 1 for row in meta["input_token_logprobs"])
        assert state["yn"] in (" yes", " no")
        assert state.text().endswith("Paris. Is that right? Answer:" + state["yn"])
    assert "normalized_unconditional_prompt_logprobs" in meta


def test_var_scope_fork_copy_bind_nested(default_backend):
    @sgl.function
    def tip(s, i):
        s += "Tip " + str(i) + ":" + sgl.gen("tip", max_tokens=4, stop="\n")

    @sgl.function
    def prog(s, topic):
        with s.var_scope("head"):
            s += "Advice about " + topic + ".\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            tip(f, i + 1)
        forks.join("gather_variable")
        forks = s.fork(2)
        forks += lambda i: "Idea " + str(i) + ":" + sgl.gen("idea", max_tokens=3, stop="\n") + "\n"
        forks.join("concate_and_append")
        with s.copy() as c:
            c += "Aside:" + sgl.gen("aside", max_tokens=2)
        return len(s["tip"])

    state = prog.bind(topic="sleep").run(temperature=0)
    assert state.error() is None, state.error()
    assert state["head"] == "Advice about sleep.\n" and state.ret_value == 2
    assert len(state["tip"]) == 2 and len(state["aside"]) == 1
    assert "Idea 0:" in state.text() and "Idea 1:" in state.text()


def test_streaming_sync_and_async(default_backend):
    state = capital.run("Italy", temperature=0, stream=True)
    chunks = list(state.text_iter("answer"))
    assert "".join(chunks) == state["answer"] and len(chunks) >= 2
    whole = capital.run("Italy", temperature=0, stream=True)
    assert "".join(whole.text_iter()) == whole.text()

    async def collect():
        s = capital.run("Italy", temperature=0, stream=True)
        return [c async for c in s.text_async_iter("answer")]

    assert "".join(asyncio.run(collect())) == state["answer"]


def test_batch_compiled_and_eager_agree_and_server_calls(default_backend):
    eager = capital.run("France", temperature=0)
    (graphed,) = capital.run_batch([("France",)], temperature=0)
    compiled = capital.compile().run(country="France", temperature=0)
    assert graphed.text() == eager.text() == compiled.text()
    assert "Paris" in graphed["answer"]
    info = sgl.get_server_info()
    assert info["chat_template"] and info["context_length"] >= 2048
    sgl.flush_cache()
    assert json.dumps(graphed.get_meta_info("answer"))  # wire meta is plain data
