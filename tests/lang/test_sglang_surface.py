"""SGLang's public frontend names with SGLang's semantics (issue 16), on the in-process fake
backend; the e2e counterparts run SGLang's test programs (test_sglang_programs.py)."""

import asyncio
import json
import re
import subprocess
import sys

import pytest

import sglite as sgl
from sglite.lang.chat_template import get_chat_template

from .fake_backend import FakeBackend


@pytest.fixture
def backend():
    return FakeBackend()


def test_engine_is_exported_lazily():
    code = "import sys, sglite; print('sglite.engine' in sys.modules, 'Engine' in sglite.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]  # `import sglite` does not load the engine
    engine = pytest.importorskip("sglite.engine")
    assert sgl.Engine is engine.Engine


class ScriptedBackend(FakeBackend):
    """FakeBackend whose generations are given texts, in order (for reasoning-format output)."""

    def __init__(self, texts, template="chatml"):
        super().__init__(template)
        self.texts = list(texts)

    def generate(self, text, params, *, stream=False):
        self._log("generate", text)
        yield self.texts.pop(0), {"prompt_tokens": len(text)}


def test_global_config_default_backend_and_generator_style(backend):
    @sgl.function
    def prog(s, i):
        s += f"Item {i}: " + sgl.gen("a") + sgl.select("k", ["x", "y"])

    sgl.set_default_backend(backend)
    try:
        assert sgl.global_config.default_backend is backend
        gen = prog.run_batch([{"i": i} for i in range(5)], generator_style=True, num_threads=2)
        assert not isinstance(gen, list)
        states = list(gen)
    finally:
        sgl.set_default_backend(None)
    assert [s["a"] for s in states] == [f"<len:{len(f'Item {i}: ')}>" for i in range(5)]
    for state in states:  # select meta info per choice, as in run (choices_logprob.py reads it)
        meta = state.get_meta_info("k")
        assert len(meta["input_token_logprobs"]) == 2 and len(meta["output_token_logprobs"]) == 2
        assert all(len(entry) == 3 for entry in meta["input_token_logprobs"][0])


def test_cache_prefills_the_constant_prefix_once(backend):
    @sgl.function
    def few_shot(s, prompt, question):
        s += prompt + "Q: What is 1+1?\nA: 2\n"
        s += "Q: " + question + "\nA:" + sgl.gen("answer", stop="\n")

    bound = few_shot.bind(prompt="Answer like a kid.\n\n")
    assert bound.cache(backend) == "Answer like a kid.\n\nQ: What is 1+1?\nA: 2\nQ: "
    assert backend.requests == [("cache_prefix", "Answer like a kid.\n\nQ: What is 1+1?\nA: 2\nQ: ")]
    assert few_shot.cache(backend) == ""  # the prompt argument comes first: nothing constant
    assert len(backend.requests) == 1


def test_base_backend_is_instantiable_and_compiles_with_llama2_chat():
    @sgl.function
    def multi_turn_chat(s):
        s += sgl.system("Be kind.")
        s += sgl.user("Who are you?")
        s += sgl.assistant(sgl.gen("answer_1"))
        s += sgl.user("Who created you?")
        s += sgl.assistant(sgl.gen("answer_2"))

    backend = sgl.BaseBackend()
    backend.chat_template = get_chat_template("llama-2-chat")
    trace = multi_turn_chat.trace(backend=backend)
    assert trace.text() == ("[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nWho are you? [/INST]{answer_1} "
                            "</s><s>[INST] Who created you? [/INST]{answer_2} </s><s>")
    assert "Gen('answer_2'" in multi_turn_chat.compile(backend=backend).print_graph()
    with pytest.raises(NotImplementedError):
        multi_turn_chat.run(backend=backend).sync() or backend.generate("x", None)


@pytest.mark.parametrize("name,first_text", [
    ("vicuna_v1.1", "A chat between a curious user and an artificial intelligence assistant. The "
                    "assistant gives helpful, detailed, and polite answers to the user's questions. "
                    "USER:hi ASSISTANT:"),
    ("qwen", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi"
             "<|im_end|>\n<|im_start|>assistant\n"),
    ("llama-3-instruct", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_named_chat_templates_frame_roles_and_stop_at_their_stop_str(name, first_text):
    backend = FakeBackend(template=name)

    @sgl.function
    def chat(s):
        s += sgl.user("hi") + sgl.assistant(sgl.gen("a"))

    seen = []
    orig = backend.generate

    def generate(text, params, *, stream=False):
        seen.append(params.stop)
        return orig(text, params, stream=stream)

    backend.generate = generate
    state = chat.run(backend=backend)
    assert state.text().startswith(first_text + "<len:")
    assert seen == [list(get_chat_template(name).stop_str) or None]  # SGLang adds stop_str


def test_separate_reasoning_splits_the_gen_span_only():
    backend = ScriptedBackend(["<think>2 and 2 make 4</think>It is 4.", "still thinking",
                               "no tags here"])

    @sgl.function
    def prog(s):
        s += sgl.user("2+2?")
        s += sgl.assistant("Answer: " + sgl.separate_reasoning(sgl.gen("a"), model_type="qwen3"))
        s += sgl.separate_reasoning(sgl.gen("b"), model_type="deepseek-r1")
        s += sgl.separate_reasoning(sgl.gen("c"), model_type="qwen3")

    state = prog.run(backend=backend)
    assert state["a"] == "It is 4." and state["a_reasoning_content"] == "2 and 2 make 4"
    assert "Answer: It is 4.<|im_end|>" in state.text()  # text before the gen in its role stays
    assert state.messages()[-1] == {"role": "assistant", "content": "Answer: It is 4."}
    assert state["b"] == "" and state["b_reasoning_content"] == "still thinking"  # r1: unclosed
    assert state["c"] == "no tags here" and state["c_reasoning_content"] == ""
    expr = sgl.separate_reasoning(sgl.gen("test_var"), model_type="deepseek-r1")
    assert len(expr.expr_list) == 2 and expr.expr_list[1].name == "test_var_reasoning_content"
    assert repr(expr.expr_list[1]) == ("SeparateReasoning(model_type=deepseek-r1, "
                                       "name=test_var_reasoning_content)")

    @sgl.function
    def unknown(s):
        s += sgl.separate_reasoning(sgl.gen("z"), model_type="nope")

    assert "Unsupported model type" in str(unknown.run(backend=ScriptedBackend(["x"])).error())


def test_gen_n_returns_k_samples_and_continues_with_the_first(backend):
    @sgl.function
    def prog(s):
        s += "Q: " + sgl.gen("a", n=3, max_tokens=4) + " then " + sgl.gen("b")

    state = prog.run(backend=backend)
    assert state["a"] == ["<len:3>"] * 3 and len(state.get_meta_info("a")) == 3
    assert state.text() == "Q: <len:3> then <len:16>"
    assert [k for k, _ in backend.requests].count("generate") == 4


def test_text_async_iter_with_meta_data(backend):
    @sgl.function
    def prog(s):
        s += "Hi " + sgl.gen("a")

    async def collect(stream):
        state = prog.run(backend=backend, stream=stream)
        return [x async for x in state.text_async_iter("a", return_meta_data=True)]

    pairs = asyncio.run(collect(True))
    assert "".join(c for c, _ in pairs) == "<len:3>" and pairs[-1][1] == {"prompt_tokens": 3}
    assert asyncio.run(collect(False)) == [("<len:3>", {"prompt_tokens": 3})]


def test_regex_constants_and_gen_int_stops():
    from sglite.lang import ir

    assert ir.REGEX_INT == r"[-+]?[0-9]+[ \n]*" and ir.REGEX_BOOL == r"(True|False)"
    assert ir.REGEX_FLOAT == r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
    for ok in ['"Paris, France"', '"a \\"b\\""', '""']:
        assert re.fullmatch(ir.REGEX_STR, ok) and json.loads(ok) is not None
    for bad in ['"a\nb"', '"a\\"', 'x']:
        assert not re.fullmatch(ir.REGEX_STR, bad)
    params = sgl.gen_int("n", stop=".").params.to_sampling_params()
    assert params["stop"] == [".", " ", "\n"] and params["regex"] == ir.REGEX_INT
    assert sgl.gen_string("w").params.to_sampling_params() == {"regex": ir.REGEX_STR}


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": -1}, "max_new_tokens"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 2**64}, "max_new_tokens"),
    ({"stop": object()}, "stop"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"n": 0}, "n"), ({"stop_regex": "("}, "stop_regex"), ({"top_k": 0}, "top_k"),
])
def test_bad_sampling_values_raise_value_error_where_written(backend, kwargs, field):
    with pytest.raises(ValueError, match=field):
        sgl.gen("a", **kwargs)


def test_bad_run_defaults_raise_value_error(backend):
    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("a")

    with pytest.raises(ValueError, match="max_new_tokens"):
        prog.run(backend=backend, max_new_tokens=-5)
    with pytest.raises(ValueError, match="temperature"):
        prog.run_batch([{}], backend=backend, temperature=float("inf"))
    assert backend.requests == []


def test_image_raises_this_model_takes_no_images(backend):
    @sgl.function
    def image_qa(s, question):
        s += sgl.user(sgl.image("example_image.png") + question)
        s += sgl.assistant(sgl.gen("answer"))

    state = image_qa.run("What is this?", backend=backend)
    assert "takes no images" in str(state.error())
    assert backend.requests == []


def test_choice_methods_on_sglang_shaped_logprobs():
    """SGLang's test_choices shape: [logprob, token_id, text] lists, an unconditional first
    token of None; the methods are importable from SGLang's module path."""
    from sglite.lang.choices import (greedy_token_selection, token_length_normalized,
                                     unconditional_likelihood_normalized)

    data = {"choices": ["cat", "catalog", "dog"],
            "normalized_prompt_logprobs": [-0.2, -0.15, -0.3],
            "input_token_logprobs": [[[-0.2, 1, None]], [[-0.2, 1, None], [-0.1, 2, None]],
                                     [[-0.5, 3, None], [-0.1, 4, None]]],
            "output_token_logprobs": [[], [], []],
            "unconditional_token_logprobs": [[[None, 1, None]], [[None, 1, None], [-2.0, 2, None]],
                                             [[None, 3, None], [-0.1, 4, None]]]}
    assert token_length_normalized(**data).decision == "catalog"
    greedy = greedy_token_selection(**data)  # ties at token 0; "cat" pads with its mean -0.2
    assert greedy.decision == "catalog"
    assert greedy.meta_info["greedy_logprob_matrix"][0] == [-0.2, -0.2]
    uncond = unconditional_likelihood_normalized(**data)
    assert uncond.decision == "catalog"  # -0.15 - (-1.0) beats -0.2 - 0 and -0.3 - (-0.05)
    assert uncond.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx(
        [-0.2, 0.85, -0.25])
