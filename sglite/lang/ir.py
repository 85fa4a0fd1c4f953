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

# SGLang's dtype regexes (gen(dtype=...), gen_int, gen_string).
REGEX_INT = r"[-+]?[0-9]+"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?"
REGEX_BOOL = r"(True|False)"
REGEX_STRING = r"\"[^\"]*\""
DTYPE_REGEX = {int: REGEX_INT, float: REGEX_FLOAT, bool: REGEX_BOOL, str: REGEX_STRING,
               "int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STRING}
# Fields that are request options rather than protocol.SamplingParams fields.
LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num")
WIRE_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}


@dataclass(frozen=True)
class GenParams:
    """Every sampling knob of `gen` and of `run(...)` defaults; None means "inherit".

    The one place the field list lives: `gen` builds one, `run`/`run_batch` build the defaults from
    their keyword arguments (`from_kwargs`), and `merge` applies SGLang's precedence (gen wins)."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
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
            if value is not None and name not in LOGPROB_FIELDS and name != "dtype":
                out[WIRE_NAMES.get(name, name)] = value
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        if self.dtype is not None:
            if self.dtype not in DTYPE_REGEX:
                raise ValueError(f"unsupported dtype {self.dtype!r}; use int, float, bool or str")
            if self.regex is not None:
                warnings.warn("both dtype and regex are set; dtype wins (as in SGLang)")
            out["regex"] = DTYPE_REGEX[self.dtype]
        if self.json_schema is not None:
            out["json_schema"] = schema_to_json(self.json_schema)
        return out

    def logprob_options(self) -> dict[str, Any]:
        return {"return_logprob": bool(self.return_logprob),
                "logprob_start_len": _first(self.logprob_start_len, -1),
                "top_logprobs_num": _first(self.top_logprobs_num, 0)}


def _first(a, b):
    return a if a is not None else b


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
            try:
                re.compile(params.regex)
            except re.error as e:
                raise ValueError(f"gen({name!r}): invalid regex {params.regex!r}: {e}") from None
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
