"""Request bodies of the OpenAI API as served here (plus SGLang's extensions: top_k, min_p,
repetition_penalty, regex, ebnf, json_schema, stop_token_ids, ignore_eos, ...).

Unknown fields are ignored, as OpenAI's server ignores what it does not know; wrong types and
values out of range fail validation (400 with OpenAI's error JSON). Responses are built as plain
dicts in server.py (one json.dumps per chunk, no model objects on the streaming path).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's and SGLang's: usage in every chunk


class JsonSchemaFormat(_Body):
    name: str = "schema"
    # "schema" shadows a BaseModel attribute, hence the alias
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingFields(_Body):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: Optional[str] = None
    # SGLang's extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Optional[Union[str, dict[str, Any]]] = None
    rid: Optional[str] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    response_format: Optional[ResponseFormat] = None


class FunctionDef(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... go to the template
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoice]] = None
    parallel_tool_calls: bool = True
    # SGLang: extra arguments of the chat template, and continuing the last assistant message
    chat_template_kwargs: Optional[dict[str, Any]] = None
    continue_final_message: bool = False
