"""Constrained generation through the real runtime: regex / JSON schema / Lark grammar outputs
match, bad specs fail only their request, and jump-forward (on here, off in a second runtime)
changes the number of decode steps but not the validity of the outputs."""

import json
import re

import jsonschema
import lark
import pytest

from sglite import protocol
from sglite.launch import RuntimeProcess

IPV4 = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
INT = r"-?(0|[1-9]\d{0,5})"
PERSON = {  # nested object, arrays and enums; every part bounded so 128 tokens always suffice
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}
ARITH = r"""
start: expr
expr: term (ADD term)~0..1
term: factor (MUL factor)~0..1
factor: NUMBER | "(" NUMBER ADD NUMBER ")"
ADD: "+" | "-"
MUL: "*" | "/"
NUMBER: /[0-9]{1,2}/
"""
CASES = {  # kind, spec, prompt, max_new_tokens (enough for the longest output + EOS)
    "ipv4": ("regex", IPV4, "The IP address of web server {i} is ", 24),
    "date": ("regex", DATE, "Event {i} happened on the date ", 16),
    "int": ("regex", INT, "The answer to question {i} is the number ", 12),
    "json": ("json_schema", json.dumps(PERSON), "A JSON record of employee {i}:\n", 128),
    "arith": ("grammar", ARITH, "Arithmetic exercise {i}: compute ", 40),
}
LARK = lark.Lark(ARITH)


def _valid(name: str, text: str) -> bool:
    kind, spec = CASES[name][:2]
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    if kind == "json_schema":
        try:
            jsonschema.validate(json.loads(text), PERSON)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    try:
        LARK.parse(text)
    except lark.exceptions.LarkError:
        return False
    return True


def _send_batch(client, jobs) -> list[str]:
    """jobs: [(case name, i)], sent at once (greedy) → their rids."""
    rids = []
    for name, i in jobs:
        kind, spec, prompt, max_new = CASES[name]
        rids.append(client.new_rid())
        client.send(protocol.GenerateReq(rid=rids[-1], text=prompt.format(i=i), sampling_params={
            "temperature": 0, "max_new_tokens": max_new, kind: spec}))
    return rids


def _collect_batch(client, jobs, rids):
    results = client.collect(rids)
    return [(name, results[rid]) for (name, _), rid in zip(jobs, rids)]


def _run_batch(client, jobs):
    return _collect_batch(client, jobs, _send_batch(client, jobs))


def _check_all_valid(outs, eos_ids):
    for name, r in outs:
        assert r["error"] is None, (name, r["error"])
        assert _valid(name, r["text"]), f"{name}: {r['text']!r} does not match"
        finish = r["meta_info"]["finish_reason"]
        assert finish["type"] == "stop" and finish["matched"] in eos_ids, (name, finish, r["text"])


@pytest.fixture
def eos_ids(client):
    return client.info()["eos_token_ids"]


def test_50_constrained_generations_match_and_complete(client, eos_ids):
    jobs = [(name, i) for name in CASES for i in range(10)]
    outs = _run_batch(client, jobs)
    _check_all_valid(outs, eos_ids)
    jumped = [r["meta_info"].get("jump_forward_tokens", 0) for name, r in outs if name == "json"]
    assert all(j > 0 for j in jumped), jumped  # fixed keys: `{"name": "`, `", "age": `, ...
    info = client.info()  # truncated KV went back: nothing held, the pool adds up
    assert info["num_running_reqs"] == 0 and info["kv_held_by_running"] == 0
    assert info["kv_free"] + info["kv_evictable"] == info["kv_total"]


@pytest.mark.parametrize("kind,spec,names", [
    ("regex", "(unclosed", "regex"),
    ("json_schema", '{"type": "object", "properties": {"a": {"type": "strin"}}}', "JSON schema"),
    ("grammar", "start: item+\nitem: UNDEFINED_TERMINAL", "Lark grammar"),
], ids=["regex", "json_schema", "grammar"])
def test_bad_spec_names_the_problem_and_the_runtime_keeps_serving(client, kind, spec, names):
    r = client.generate("Hi", sampling_params={"max_new_tokens": 4, kind: spec})
    assert r["error"] is not None and names in r["error"], r
    good = client.generate("The IP address of the router is ", sampling_params={
        "temperature": 0, "max_new_tokens": 24, "regex": IPV4})
    assert good["error"] is None and re.fullmatch(IPV4, good["text"]), good


def test_max_new_tokens_cuts_a_jumping_grammar(client):
    r = client.generate("A JSON record of employee 3:\n", sampling_params={
        "temperature": 0, "max_new_tokens": 5, "json_schema": json.dumps(PERSON)})
    meta = r["meta_info"]
    assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 5
    assert r["text"].startswith('{"name": "')  # the first jump fit the budget


def test_stop_string_in_forced_text_ends_the_request(client):
    r = client.generate("A JSON record of employee 3:\n", stream=True, sampling_params={
        "temperature": 0, "max_new_tokens": 64, "json_schema": json.dumps(PERSON),
        "stop": ['"age"']})
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": '"age"'}
    assert r["text"].startswith('{"name": "') and r["text"].endswith('", ')


def test_streamed_jumps_add_up_to_the_unstreamed_text(client):
    params = {"temperature": 0, "max_new_tokens": 128, "json_schema": json.dumps(PERSON)}
    rids = [client.new_rid(), client.new_rid()]
    for rid, stream in zip(rids, (False, True)):
        client.send(protocol.GenerateReq(rid=rid, text="A JSON record of employee 7:\n",
                                         sampling_params=params, stream=stream))
    results = client.collect(rids)
    full, streamed = results[rids[0]], results[rids[1]]
    assert "".join(streamed["chunks"]) == full["text"] and _valid("json", full["text"])
    assert any('"age": ' in c for c in streamed["chunks"])  # forced text arrives in one piece


@pytest.fixture(scope="module")
def no_jump_runtime():
    from tests.conftest import E2E_RUNTIME_ARGS

    with RuntimeProcess(None, timeout=900, **E2E_RUNTIME_ARGS, disable_jump_forward=True,
                        num_threads=1) as rt:  # beside the shared runtime on 2 cores
        yield rt


def test_jump_forward_off_gives_equally_valid_outputs(no_jump_runtime, make_client, client, eos_ids):
    jobs = [(name, i) for name in ("json", "date", "arith") for i in range(4)]
    off_client = make_client(no_jump_runtime.address, alive=no_jump_runtime.is_alive)
    on_rids, off_rids = _send_batch(client, jobs), _send_batch(off_client, jobs)
    on, off = _collect_batch(client, jobs, on_rids), _collect_batch(off_client, jobs, off_rids)
    _check_all_valid(on, eos_ids)
    _check_all_valid(off, eos_ids)
    assert all("jump_forward_tokens" not in r["meta_info"] for _, r in off)
    assert sum(r["meta_info"].get("jump_forward_tokens", 0) for _, r in on) > 0
