"""The frontend's IR: one class per DSL primitive, plus GenParams, the one sampling definition.

`"Q: " + gen("a") + "\n"` builds an ExprList; `s += expr` hands it to the program's executor,
which has one `_execute_<class>` method per class here (interpreter.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

from sglite.choices import ChoicesSamplingMethod, get_choices_method

# SGLang's dtype regexes (gen(dtype=...), gen_int, gen_string), with SGLang's values for int,
# float and bool (a number may end in spaces/newlines; gen_int and dtype=int/float also stop at
# " " and "\n"). REGEX_STR differs on purpose: SGLang's r'"[\w\d\s]*"' cannot write a comma or a
# hyphen and lets a raw newline into a JSON string; this is a JSON string literal (any character
# but a quote, backslash or control character, or a JSON escape), so `json.loads` accepts it.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"'
REGEX_STRING = REGEX_STR  # SGLang's older name
DTYPE_REGEX = {int: REGEX_INT, float: REGEX_FLOAT, bool: REGEX_BOOL, str: REGEX_STR,
               "int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STR}
DTYPE_STOPS = {int: [" ", "\n"], float: [" ", "\n"], "int": [" ", "\n"], "float": [" ", "\n"]}
# Fields that are request options or frontend-only, not protocol.SamplingParams fields.
LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num",
                  "return_text_in_logprobs")
FRONTEND_FIELDS = LOGPROB_FIELDS + ("dtype", "n")
WIRE_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}


@dataclass(frozen=True)
class GenParams:
    """Every sampling knob of `gen` and of `run(...)` defaults; None means "inherit".

    The one place the field list lives: `gen` builds one, `run`/`run_batch` build the defaults from
    their keyword arguments (`from_kwargs`), and `merge` applies SGLang's precedence (gen wins)."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    n: int | None = None  # samples (gen(n=k): the variable is a list of k texts)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: Any = None
    regex: str | None = None
    json_schema: Any = None
    grammar: str | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], arg_names=()) -> tuple["GenParams", dict]:
        """Split run() kwargs into sampling defaults and program arguments (a program argument
        that shares a field's name stays a program argument)."""
        names = set(cls.field_names()) - set(arg_names)
        kwargs = dict(kwargs)
        if "max_new_tokens" in kwargs:  # SGLang's run-level spelling
            kwargs["max_tokens"] = kwargs.pop("max_new_tokens")
        params = {k: v for k, v in kwargs.items() if k in names}
        return cls(**params), {k: v for k, v in kwargs.items() if k not in names}

    def merge(self, defaults: "GenParams") -> "GenParams":
        return GenParams(**{name: _first(getattr(self, name), getattr(defaults, name))
                            for name in self.field_names()})

    @property
    def needs_logprobs(self) -> bool:
        return bool(self.return_logprob or self.top_logprobs_num)

    def to_sampling_params(self) -> dict[str, Any]:
        """The wire dict (protocol.SamplingParams names); unset fields are left to the runtime."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            if value is not None and name not in FRONTEND_FIELDS:
                out[WIRE_NAMES.get(name, name)] = value
        for name in ("stop", "stop_regex"):
            if isinstance(out.get(name), str):
                out[name] = [out[name]]
        if self.dtype is not None:
            if self.dtype not in DTYPE_REGEX:
                raise ValueError(f"unsupported dtype {self.dtype!r}; use int, float, bool or str")
            if self.regex is not None:
                warnings.warn("both dtype and regex are set; dtype wins (as in SGLang)")
            out["regex"] = DTYPE_REGEX[self.dtype]
            if self.dtype in DTYPE_STOPS:  # SGLang's _handle_dtype_to_regex
                out["stop"] = list(out.get("stop", [])) + DTYPE_STOPS[self.dtype]
        if self.json_schema is not None:
            out["json_schema"] = schema_to_json(self.json_schema)
        return out

    def validate(self, where: str) -> None:
        """Raise ValueError naming the field for a value the runtime would refuse (negative
        max_tokens, NaN temperature, ...), where the user wrote it (SGLang's frontend asserts)."""
        from sglite import protocol

        if self.n is not None and (not isinstance(self.n, int) or isinstance(self.n, bool)
                                   or self.n < 1):
            raise ValueError(f"{where}: n must be an integer >= 1, got {self.n!r}")
        for pattern in _as_list(self.stop_regex):
            _check_regex(where, pattern, "stop_regex")
        for name in ("max_tokens", "min_tokens", "top_k", "logprob_start_len", "top_logprobs_num"):
            value = getattr(self, name)
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                raise ValueError(f"{where}: {WIRE_NAMES.get(name, name)} is out of range: {value}")
        try:
            protocol.parse_sampling_params(self.to_sampling_params())
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None

    def logprob_options(self) -> dict[str, Any]:
        return {"return_logprob": bool(self.return_logprob),
                "logprob_start_len": _first(self.logprob_start_len, -1),
                "top_logprobs_num": _first(self.top_logprobs_num, 0)}


def _first(a, b):
    return a if a is not None else b


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _check_regex(where: str, pattern, field: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"{where}: {field} must be a string, got {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: invalid {field} {pattern!r}: {e}") from None


def schema_to_json(schema: Any) -> str:
    """A dict, a JSON string, or a pydantic model class -> a JSON schema string."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # pydantic v2
        return json.dumps(schema.model_json_schema())
    raise TypeError(f"json_schema must be a dict, a JSON string or a pydantic model class, "
                    f"got {type(schema).__name__}")


class CannotTrace(Exception):
    """trace(): the program's Python control flow depends on a placeholder (an argument not
    given, or a generated value), which has no value until the program runs."""


class Expr:
    """Anything that can be appended to a program: `expr + expr` and `"str" + expr` concatenate."""

    def __add__(self, other) -> "ExprList":
        return ExprList([self, as_expr(other)])

    def __radd__(self, other) -> "ExprList":
        return ExprList([as_expr(other), self])


def as_expr(value) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    if value is None:
        raise ValueError("cannot append None to a program")
    raise TypeError(f"cannot append a {type(value).__name__} to a program; use str(...) first")


class ExprList(Expr):
    def __init__(self, exprs: list[Expr]):
        # Flatten so that long concatenations stay one level deep.
        self.exprs = [e for x in exprs for e in (x.exprs if isinstance(x, ExprList) else [x])]

    @property
    def expr_list(self) -> list[Expr]:  # SGLang's name
        return self.exprs

    def __repr__(self) -> str:
        return f"ExprList({self.exprs!r})"


class Text(Expr):
    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return f"Text({self.value!r})"


class Gen(Expr):
    def __init__(self, name: str | None, params: GenParams):
        if params.regex is not None:
            _check_regex(f"gen({name!r})", params.regex, "regex")
        self.name, self.params = name, params

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class Select(Expr):
    def __init__(self, name: str | None, choices: list[str], *, temperature: float = 0.0,
                 choices_method: str | ChoicesSamplingMethod = "token_length_normalized"):
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"select({name!r}) needs a non-empty list of strings, got {choices!r}")
        if temperature > 1e-5:
            raise ValueError("select scores choices deterministically; temperature must be 0")
        self.name, self.choices = name, list(choices)
        self.choices_method = get_choices_method(choices_method)

    def __repr__(self) -> str:
        return f"Select({self.name!r}, {self.choices!r})"


class SeparateReasoning(Expr):
    """After `expr` (a gen or select) ran: split its text into the answer (kept in its variable
    and in the text) and the reasoning (variable `<name>_reasoning_content`), by the reasoning
    format `model_type` ("deepseek-r1", "qwen3", ...; see reasoning.py). SGLang's shape: it is the
    second element of the ExprList that `separate_reasoning(expr, model_type)` returns."""

    def __init__(self, model_type: str | None, expr: Expr | None):
        self.model_type, self.expr = model_type, expr
        self.name: str | None = None
        for sub in expr.exprs if isinstance(expr, ExprList) else [expr]:
            if isinstance(sub, (Gen, Select)):
                self.name = self.process_name_for_reasoning(sub.name)

    @staticmethod
    def process_name_for_reasoning(name: str | None) -> str:
        if not name:
            raise ValueError("separate_reasoning needs a named gen or select")
        return f"{name}_reasoning_content"

    def __repr__(self) -> str:
        return f"SeparateReasoning(model_type={self.model_type}, name={self.name})"


class Image(Expr):
    """sgl.image(path) / sgl.video(path, num_frames): the interpreter refuses them while no
    served model takes images (the error names the model)."""

    def __init__(self, path, num_frames: int | None = None):
        self.path, self.num_frames = path, num_frames

    def __repr__(self) -> str:
        return f"Image({self.path!r})"


class RoleBegin(Expr):
    def __init__(self, role: str):
        self.role = role


class RoleEnd(Expr):
    def __init__(self, role: str):
        self.role = role


class VarScopeBegin(Expr):
    def __init__(self, name: str):
        self.name = name


class VarScopeEnd(Expr):
    def __init__(self, name: str):
        self.name = name


class Argument(Expr):
    """A placeholder for a program argument during `trace()`/`compile()`.

    Python formats f-strings eagerly, so `f"Q: {question}"` would bake the placeholder into a
    constant; it raises instead, telling the user to concatenate."""

    def __init__(self, name: str):
        self.name = name

    def _refuse(self, *_args):
        raise TypeError(
            f"argument {self.name!r} is a placeholder while the program is traced/compiled, so it "
            f"cannot be formatted into an f-string or str(); write `\"...\" + {self.name} + \"...\"` "
            f"instead, or run the program eagerly with f.run(...)")

    __format__ = __str__ = _refuse

    def __bool__(self):
        raise CannotTrace(f"Python control flow depends on placeholder {self.name!r}")

    def __repr__(self) -> str:
        return f"Argument({self.name!r})"


class Variable(Argument):
    """trace(): a placeholder for a generated value read while tracing (`s["a"]`); `source` is
    the tracer node that produces it."""

    def __init__(self, name: str, source):
        super().__init__(name)
        self.source = source

    def __repr__(self) -> str:
        return f"Variable({self.name!r})"
