"""Interpreter, tracer and state semantics on an in-process fake backend (no model).

The fake's generations are functions of the prompt, so equal texts mean equal prompts were sent."""

import asyncio
import json

import pydantic
import pytest

import sglite as sgl
from sglite.lang import ir
from sglite.lang.chat_template import chat_template_from_jinja

from .fake_backend import FakeBackend


@pytest.fixture
def backend():
    return FakeBackend()


@sgl.function
def chat_program(s, question):
    s += sgl.system("Be brief.")
    with s.user():
        s += "Q: " + question
    s += sgl.assistant(sgl.gen("answer", max_tokens=4))
    s += "Kind: " + sgl.select("kind", ["city", "country"]) + "\n"
    forks = s.fork(2)
    forks += lambda i: f"Branch {i}: " + sgl.gen("detail", stop="\n")
    s += "Done " + sgl.gen("last")


def test_run_batch_matches_run(backend):
    eager = chat_program.run("Capital of France?", backend=backend)
    eager.sync()
    (graphed,) = chat_program.run_batch([{"question": "Capital of France?"}], backend=backend)
    assert graphed.text() == eager.text()
    assert graphed["answer"] == eager["answer"] and graphed["kind"] == eager["kind"]
    assert eager.text().startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert eager.messages()[1] == {"role": "user", "content": "Q: Capital of France?"}
    assert eager.messages()[2]["content"] == eager["answer"]
    assert eager.get_meta_info("answer")["prompt_tokens"] == eager.text().index(eager["answer"])


def test_trace_records_placeholders_forks_and_sends_nothing(backend):
    trace = chat_program.trace(backend=backend)
    assert backend.requests == []  # tracing never reaches the backend
    kinds = [n.kind for n in trace.nodes]
    assert kinds.count("gen") == 2 and kinds.count("select") == 1 and kinds.count("fork") == 1
    first_arg = kinds.index("argument")  # the placeholder for `question`, after constant text
    assert set(kinds[:first_arg]) == {"text"} and trace.nodes[first_arg].name == "question"
    assert trace.constant_prefix.endswith("Q: ") and "Be brief." in trace.constant_prefix
    assert trace.text().endswith("Kind: {kind}\nDone {last}")  # gens are placeholders
    graph = trace.last_node.print_graph_dfs()
    lines = graph.splitlines()
    assert lines[-1].startswith(f"%{trace.last_node.node_id} = %") and "Gen('last'" in lines[-1]
    assert len(lines) == len(trace.nodes)  # the branches are not ancestors of the last node


def test_trace_reads_of_generated_values_are_placeholders(backend):
    @sgl.function
    def expand(s, tip):
        s += "Expand: " + tip + sgl.gen("detailed_tip")

    @sgl.function
    def tips(s):
        s += "1." + sgl.gen("tip_1", stop="\n")
        forks = s.fork(2)
        for i in range(2):
            forks[i] += f"Now tip {i}: " + sgl.gen("d")  # ProgramStateGroup.__setitem__
        branch = expand(tip=s["tip_1"])  # a nested program is traced, not run
        s += "T:" + forks[0]["d"] + branch["detailed_tip"] + sgl.gen("summary")

    trace = tips.trace(backend=backend)
    assert backend.requests == []
    graph = trace.last_node.print_graph_dfs()
    assert "Variable('d')" in graph and "Variable('detailed_tip')" in graph
    assert "Now tip 0: " in graph  # the branch a read depends on is printed
    by_id = {n.node_id: n for n in trace.nodes}
    variable = next(n for n in by_id.values() if n.kind == "variable" and n.name == "d")
    assert variable.source.kind == "gen" and variable.source.prev_node.text == "Now tip 0: "
    with pytest.raises(TypeError):
        tips.compile(backend=backend).print_graph() and f"{trace['tip_1']}"


def test_fstring_on_argument_raises_when_traced(backend):
    @sgl.function
    def bad(s, question):
        s += f"Q: {question}" + sgl.gen("a")

    with pytest.raises(TypeError, match="f-string"):
        bad.trace(backend=backend)
    bad.run("fine when eager", backend=backend).sync()  # real values format normally


def test_value_dependent_program_runs_in_a_batch(backend):
    @sgl.function
    def loop(s):
        s += "x" + sgl.gen("a", max_tokens=2)
        if s["a"].startswith("<"):  # Python control flow on a generated value
            s += sgl.gen("b")

    (state,) = loop.run_batch([{}], backend=backend)
    assert state["b"]


def test_sampling_precedence_and_constraints(backend):
    class Person(pydantic.BaseModel):
        name: str

    @sgl.function
    def prog(s):
        s += sgl.gen("a", max_tokens=3, temperature=0.5) + sgl.gen_int("n") + sgl.gen(
            "p", json_schema=Person) + sgl.gen("g", grammar='start: "x"') + sgl.gen("f", dtype=float)

    nodes = [n for n in prog.trace(backend=backend, temperature=0.0, max_new_tokens=9).nodes
             if n.kind == "gen"]
    assert nodes[0].sampling_params == {"max_new_tokens": 3, "temperature": 0.5}
    assert nodes[1].sampling_params == {"max_new_tokens": 9, "temperature": 0.0,
                                        "regex": ir.REGEX_INT, "stop": [" ", "\n"]}  # SGLang's
    assert json.loads(nodes[2].sampling_params["json_schema"])["properties"]["name"]
    assert nodes[3].sampling_params["grammar"] == 'start: "x"'
    assert nodes[4].sampling_params["regex"] == ir.REGEX_FLOAT
    with pytest.raises(ValueError, match="invalid regex"):
        sgl.gen("r", regex="(")
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("d", dtype=list)


def test_fork_join_copy_var_scope_bind_and_nesting(backend):
    @sgl.function
    def helper(s, tag):
        s += tag + sgl.gen("h")

    @sgl.function
    def prog(s, topic):
        with s.var_scope("intro"):
            s += "About " + topic + ". "
        forks = s.fork(3)
        forks += [sgl.gen("v") for _ in range(3)]
        forks.join("gather_variable")
        forks = s.fork(2)
        forks += lambda i: str(i)
        forks.join("concate_and_append")
        with s.copy() as c:
            c += sgl.gen("copied")
        helper(s, "[h]")
        return "ret"

    state = prog.bind(topic="cats").run(backend=backend)
    assert state["intro"] == "About cats. "
    assert len(state["v"]) == 3 and state["copied"] == [state["copied"][0]]
    assert "01[h]" in state.text() and state["h"].startswith("<len:")
    assert state.ret_value == "ret"
    assert [k for k, _ in backend.requests].count("cache_prefix") == 2  # fork(3), fork(2)


def test_errors_reach_caller_and_batch_finishes(backend):
    @sgl.function
    def prog(s, regex):
        s += "x" + sgl.gen("a", regex=regex) + sgl.gen("b")

    states = prog.run_batch([{"regex": "[0-9]"}, {"regex": "("}, {"regex": "[a-z]"}],
                            backend=backend, num_threads=2)
    assert states[1].error() is not None and "invalid regex" in str(states[1].error())
    with pytest.raises(RuntimeError, match="invalid regex"):
        states[1]["b"]
    assert states[0].error() is None and states[2]["b"].startswith("<len:")


def test_streaming_text_iter_and_async(backend):
    @sgl.function
    def prog(s):
        s += "Hi " + sgl.gen("a") + " and " + sgl.gen("b")

    state = prog.run(backend=backend, stream=True)
    assert "".join(state.text_iter("a")) == state["a"]
    assert "".join(state.text_iter()) == state.text()

    async def collect():
        return [c async for c in prog.run(backend=backend, stream=True).text_async_iter("b")]

    assert "".join(asyncio.run(collect())).startswith("<len:")


def test_template_default_system_prompt_inserted():
    jinja = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
             "{{ '<s>system\nDefault.</s>\n' }}{% endif %}{{ '<s>' + m['role'] + '\n' + "
             "m['content'] + '</s>\n' }}{% endfor %}")
    backend = FakeBackend()
    backend.template = chat_template_from_jinja(jinja)

    @sgl.function
    def prog(s):
        s += sgl.user("hi")

    state = prog.run(backend=backend)
    assert state.text() == "<s>system\nDefault.</s>\n<s>user\nhi</s>\n"
    assert state.messages()[0] == {"role": "system", "content": "Default."}


def test_reads_race_ahead_of_a_streaming_body_and_typos_fail_fast(backend):
    @sgl.function
    def slow_body(s):
        import time

        time.sleep(0.2)  # the caller reads s["a"] before the body declared it
        s += "x" + sgl.gen("a")

    assert slow_body.run(backend=backend, stream=True)["a"].startswith("<len:")

    @sgl.function
    def typo(s):
        s += "x" + sgl.gen("a")
        return s["b"]

    with pytest.raises(KeyError, match="'b'"):
        typo.run(backend=backend)


def test_template_never_sends_bos_text():
    llama3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
              "{% endif %}")
    t = chat_template_from_jinja(llama3)
    assert t.get_prefix_and_suffix("user") == ("<|start_header_id|>user<|end_header_id|>\n\n",
                                               "<|eot_id|>")
    assert t.default_system_text == ""
