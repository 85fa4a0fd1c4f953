"""Tool calls out of model text for each chat-template family (pure functions, no server)."""

import json

import pytest

from sglite.http.tool_parsers import detect_parser, forced_schema, get_parser


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_qwen_tool_call_blocks():
    p = get_parser("qwen")
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
            '</tool_call>')
    content, calls = p.parse(text)
    assert content == "Let me look."
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2
    # an unterminated last block (max_tokens hit after the JSON) still parses; broken JSON stays text
    assert _calls(p.parse('<tool_call>{"name": "f", "arguments": {}}')[1]) == [("f", {})]
    assert p.parse("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    assert p.parse("no calls here") == ("no calls here", [])


def test_llama3_json_calls():
    p = get_parser("llama3")
    content, calls = p.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content == "" and _calls(calls) == [("get_weather", {"city": "Oslo"})]
    text = ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; '
            '{"name": "b", "parameters": {"y": "z"}}')
    assert _calls(p.parse(text)[1]) == [("a", {"x": 1}), ("b", {"y": "z"})]
    # arguments written as a JSON string are decoded
    assert _calls(p.parse('{"name": "a", "arguments": "{\\"x\\": 2}"}')[1]) == [("a", {"x": 2})]
    assert p.parse("The answer is {not a call}") == ("The answer is {not a call}", [])
    assert p.parse('{"no_name": 1}') == ('{"no_name": 1}', [])


def test_mistral_tool_calls_both_formats():
    p = get_parser("mistral")
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, ' \
           '{"name": "get_time", "arguments": {}}]'
    content, calls = p.parse(text)
    assert content == "" and _calls(calls) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}'
    assert _calls(p.parse(v11)[1]) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    assert p.parse("plain answer") == ("plain answer", [])
    assert p.parse("[TOOL_CALLS] [{oops") == ("[TOOL_CALLS] [{oops", [])


@pytest.mark.parametrize("name,text,held", [
    ("hermes", "Sure. <tool_call>\n{", 6),
    ("hermes", "Sure. <tool_", 6),  # a marker's prefix at the end is held back too
    ("hermes", "Sure. <b>", 9),
    ("mistral", "ok [TOOL_C", 3),
    ("llama3", '{"name"', 0),
    ("llama3", "Hello", 5),
])
def test_streaming_hold_back(name, text, held):
    assert get_parser(name).hold_from(text) == held


def test_parser_detection_from_chat_templates():
    assert detect_parser("{{ '<|im_start|>' + message['role'] }}") == "hermes"
    assert detect_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_parser("<|start_header_id|>{{ role }}<|end_header_id|>") == "llama3"
    assert detect_parser("[AVAILABLE_TOOLS] {{ tools }} [TOOL_CALLS]") == "mistral"
    assert detect_parser(None) is None
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_parser("nope")


def test_forced_schemas():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "g"}}]
    assert forced_schema(tools, "f") == tools[0]["function"]["parameters"]
    req = forced_schema(tools, None)
    assert req["type"] == "array" and req["minItems"] == 1
    assert [i["properties"]["name"] for i in req["items"]["anyOf"]] == [{"enum": ["f"]},
                                                                         {"enum": ["g"]}]
    with pytest.raises(ValueError, match="not among the tools"):
        forced_schema(tools, "h")
