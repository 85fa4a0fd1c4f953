"""Reasoning formats for `sgl.separate_reasoning`: split a generation into (reasoning, answer).

The rules are SGLang's (srt/parser/reasoning_parser.py, `parse_non_stream`) for the families
sglite serves:
- "deepseek-r1": the model thinks from its first token (its chat template opens `<think>` in the
  prompt), so everything before `</think>` is reasoning, with or without a leading `<think>`; a
  generation that never closes it is all reasoning (cut by max_tokens while thinking).
- "qwen3" (also "deepseek-v3", "glm45", "kimi_k2": the same tags): reasoning only if the text
  holds `<think>`; a `<tool_call>` before `</think>` also ends the reasoning (kept in the answer).
- "qwen3-thinking" (Qwen3 *-Thinking-2507): always reasoning first, like deepseek-r1.
The answer keeps the text after `</think>` as generated (SGLang does not strip it either).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    think_start: str = "<think>"
    think_end: str = "</think>"
    force_reasoning: bool = False  # reasoning from the first token, even without think_start
    tool_start: str | None = None  # a tool call that also ends the reasoning

    def parse(self, text: str) -> tuple[str, str]:
        """-> (reasoning, answer)."""
        if not (self.force_reasoning or self.think_start in text):
            return "", text
        body = text
        while body.startswith(self.think_start):
            body = body[len(self.think_start):]
        if self.think_end in body:
            reasoning, _, answer = body.partition(self.think_end)
            return reasoning, answer
        if self.tool_start is not None and self.tool_start in body:
            cut = body.index(self.tool_start)
            return body[:cut], body[cut:]
        return body, ""  # the reasoning never closed


_QWEN3 = ReasoningFormat(tool_start="<tool_call>")
FORMATS = {
    "deepseek-r1": ReasoningFormat(force_reasoning=True),
    "qwen3": _QWEN3,
    "qwen3-thinking": ReasoningFormat(force_reasoning=True, tool_start="<tool_call>"),
    "deepseek-v3": ReasoningFormat(),
    "glm45": ReasoningFormat(),
    "kimi_k2": ReasoningFormat(tool_start="<|tool_calls_section_begin|>"),
}


def get_reasoning_format(model_type: str | None) -> ReasoningFormat:
    if model_type is None:
        raise ValueError("separate_reasoning needs model_type (e.g. 'deepseek-r1' or 'qwen3')")
    if model_type not in FORMATS:
        raise ValueError(f"Unsupported model type: {model_type!r}; known: {sorted(FORMATS)}")
    return FORMATS[model_type]
