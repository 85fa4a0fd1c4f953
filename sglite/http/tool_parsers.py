"""Tool calls parsed out of a model's text, one parser per chat-template family:

    hermes (Qwen 2/2.5/3, Hermes, ChatML models):  <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
    llama3 (Llama 3.1/3.2 JSON tool calling):      [<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]
    mistral:                                       [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
                                                   (or v11: [TOOL_CALLS]name[ARGS]{...})

`parse(text)` returns (the text outside the calls, [ToolCall]); a call whose JSON does not parse
stays in the text. `hold_from(text)` says from which index a stream must stop emitting content,
because a call may be starting there (a marker, or a prefix of one at the end of the text); the
held text is parsed when the generation ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


_decoder = json.JSONDecoder()


def _call_from_obj(obj, args_keys=("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if not isinstance(args, dict):
                return None
            return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))
    return ToolCall(obj["name"], "{}")


def _partial_marker_at_end(text: str, marker: str) -> int:
    """Index where a proper prefix of `marker` ends the text, else len(text)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)


class ToolParser:
    name = "base"
    markers: tuple[str, ...] = ()

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        idx = len(text)
        for m in self.markers:
            found = text.find(m)
            idx = min(idx, found if found >= 0 else _partial_marker_at_end(text, m))
        return idx


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        calls, kept, pos = [], [], 0
        for m in self._block.finditer(text):
            call = None
            try:
                call = _call_from_obj(json.loads(m.group(1)))
            except ValueError:
                pass
            if call is None:
                continue
            kept.append(text[pos:m.start()])
            pos = m.end()
            calls.append(call)
        kept.append(text[pos:])
        return "".join(kept).strip() if calls else text, calls


class Llama3Parser(ToolParser):
    name = "llama3"
    markers = ("<|python_tag|>",)

    def parse(self, text):
        body = text
        prefix = ""
        if "<|python_tag|>" in text:
            prefix, _, body = text.partition("<|python_tag|>")
        stripped = body.lstrip()
        if not stripped.startswith("{"):
            return text, []
        calls, pos = [], 0
        while pos < len(stripped):
            try:
                obj, end = _decoder.raw_decode(stripped, pos)
            except ValueError:
                break
            call = _call_from_obj(obj, ("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
            pos = end
            while pos < len(stripped) and stripped[pos] in " \t\n;":
                pos += 1
        if not calls:
            return text, []
        return (prefix + stripped[pos:]).strip(), calls

    def hold_from(self, text):
        idx = super().hold_from(text)
        if text.lstrip().startswith("{"):  # a bare JSON call starts the answer
            return 0
        return idx


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def parse(self, text):
        if "[TOOL_CALLS]" not in text:
            return text, []
        head, _, body = text.partition("[TOOL_CALLS]")
        calls: list[ToolCall] = []
        body = body.strip()
        if body.startswith("["):
            try:
                arr, end = _decoder.raw_decode(body)
            except ValueError:
                return text, []
            for obj in arr if isinstance(arr, list) else []:
                call = _call_from_obj(obj)
                if call is not None:
                    calls.append(call)
            rest = body[end:]
        else:  # v11: name[ARGS]{...} per call, each after its own [TOOL_CALLS]
            rest = ""
            for piece in body.split("[TOOL_CALLS]"):
                name, sep, args = piece.partition("[ARGS]")
                if not sep:
                    rest += piece
                    continue
                try:
                    obj, end = _decoder.raw_decode(args.strip())
                except ValueError:
                    return text, []
                call = _call_from_obj({"name": name.strip(), "arguments": obj})
                if call is not None:
                    calls.append(call)
                rest += args.strip()[end:]
        if not calls:
            return text, []
        return (head + rest).strip(), calls


PARSERS = {"hermes": HermesParser, "qwen": HermesParser, "qwen25": HermesParser,
           "llama3": Llama3Parser, "mistral": MistralParser}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {sorted(PARSERS)}")
    return PARSERS[name]()


def detect_parser(chat_template: str | None) -> str | None:
    """The family of a model's chat template, or None when it shows none."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "<tool_call>" in t or "<|im_start|>" in t:
        return "hermes"
    if "<|start_header_id|>" in t or "<|python_tag|>" in t:
        return "llama3"
    return None


def forced_schema(tools: list[dict], name: str | None) -> dict:
    """The JSON schema a forced tool choice constrains the output to (as SGLang does): the named
    function's parameters, or for "required" an array of {name, parameters} of any tool."""
    def params(fn):
        return fn.get("parameters") or {"type": "object", "properties": {}}

    if name is not None:
        for t in tools:
            if t["function"]["name"] == name:
                return params(t["function"])
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    items = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                  "parameters": params(t["function"])},
              "required": ["name", "parameters"]} for t in tools]
    return {"type": "array", "minItems": 1,
            "items": items[0] if len(items) == 1 else {"anyOf": items}}
