"""The user-facing primitives (SGLang's names and arguments): they build IR, nothing runs here."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from sglite.choices import ChoicesSamplingMethod
from sglite.lang import ir
from sglite.lang.backend.base import BaseBackend
from sglite.lang.function import SglFunction, resolve_backend, set_default_backend

__all__ = ["function", "gen", "gen_int", "gen_string", "select", "image", "video",
           "separate_reasoning", "system", "user", "assistant",
           "system_begin", "system_end", "user_begin", "user_end", "assistant_begin",
           "assistant_end", "set_default_backend", "flush_cache", "get_server_info"]


def function(func: Callable | None = None, *, num_api_spec_tokens: int | None = None):
    """`@sgl.function` or `@sgl.function(...)`: the first parameter must be `s`."""
    del num_api_spec_tokens  # OpenAI-style API speculation; the sglite runtime has no use for it
    if func is None:
        return lambda f: SglFunction(f)
    return SglFunction(func)


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        n: int | None = None, stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None, stop_regex: str | list[str] | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        min_p: float | None = None, frequency_penalty: float | None = None,
        presence_penalty: float | None = None, ignore_eos: bool | None = None,
        return_logprob: bool | None = None, logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None,
        dtype: Any = None, choices: list[str] | None = None,
        choices_method: str | ChoicesSamplingMethod | None = None, regex: str | None = None,
        json_schema: Any = None, *, grammar: str | None = None) -> ir.Expr:
    """Generate into variable `name` (SGLang's positional order); None arguments inherit the
    run(...) defaults. `choices=[...]` makes it a select; `n=k` samples k texts (the variable is
    their list, the text continues with the first); json_schema may be a dict, JSON string or
    pydantic class; grammar is Lark EBNF. Bad values raise ValueError here."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or "token_length_normalized")
    constraints = [x for x in (regex, json_schema, grammar) if x is not None]
    if len(constraints) > 1:
        raise ValueError(f"gen({name!r}): at most one of regex, json_schema, grammar")
    params = ir.GenParams(
        max_tokens=max_tokens, min_tokens=min_tokens, n=n, stop=stop,
        stop_token_ids=stop_token_ids, stop_regex=stop_regex, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs, dtype=dtype, regex=regex,
        json_schema=json_schema, grammar=grammar)
    params.validate(f"gen({name!r})")  # bad values fail here, where the user wrote them
    return ir.Gen(name, params)


def gen_int(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
            stop: str | list[str] | None = None, **kwargs) -> ir.Expr:
    """SGLang's gen_int: regex REGEX_INT, stops " " and "\\n" added to `stop`."""
    return gen(name, max_tokens, n=n, stop=stop, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
               stop: str | list[str] | None = None, **kwargs) -> ir.Expr:
    """A quoted JSON string (regex REGEX_STR)."""
    return gen(name, max_tokens, n=n, stop=stop, dtype=str, **kwargs)


def image(expr) -> ir.Image:
    return ir.Image(expr)


def video(path: str, num_frames: int) -> ir.Image:
    return ir.Image(path, num_frames)


def separate_reasoning(expr: ir.Expr | None = None, model_type: str | None = None) -> ir.ExprList:
    """`s += sgl.assistant(sgl.separate_reasoning(sgl.gen("a"), model_type="qwen3"))`: after the
    gen, `s["a"]` holds the answer and `s["a_reasoning_content"]` the reasoning."""
    return ir.ExprList([expr, ir.SeparateReasoning(model_type, expr)])


def select(name: str | None = None, choices: list[str] | None = None, *,
           temperature: float = 0.0,
           choices_method: str | ChoicesSamplingMethod = "token_length_normalized") -> ir.Select:
    if choices is None:
        raise ValueError(f"select({name!r}) needs choices=[...]")
    return ir.Select(name, choices, temperature=temperature, choices_method=choices_method)


def _role(role: str, expr) -> ir.ExprList:
    if expr is None:
        return ir.ExprList([ir.RoleBegin(role), ir.RoleEnd(role)])
    return ir.RoleBegin(role) + ir.as_expr(expr) + ir.RoleEnd(role)


def system(expr=None) -> ir.ExprList:
    return _role("system", expr)


def user(expr=None) -> ir.ExprList:
    return _role("user", expr)


def assistant(expr=None) -> ir.ExprList:
    return _role("assistant", expr)


# sgl.user_begin() / sgl.user_end() etc.: bare role markers, for roles that span several `s +=`.
system_begin, system_end = partial(ir.RoleBegin, "system"), partial(ir.RoleEnd, "system")
user_begin, user_end = partial(ir.RoleBegin, "user"), partial(ir.RoleEnd, "user")
assistant_begin = partial(ir.RoleBegin, "assistant")
assistant_end = partial(ir.RoleEnd, "assistant")


def flush_cache(backend: BaseBackend | None = None, empty_cache: bool = True) -> None:
    resolve_backend(backend).flush_cache(empty_cache=empty_cache)


def get_server_info(backend: BaseBackend | None = None) -> dict[str, Any]:
    return resolve_backend(backend).get_server_info()
