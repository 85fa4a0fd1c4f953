"""Random generations driven by the mask (no model): every terminated output must match."""

import json
import random
import re

import pytest

from sglite.lang.ir import DTYPE_REGEX  # the frontend's gen(dtype=...) table
from sglite.runtime.sampling.constrained import GrammarState

IPV4 = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
INT = r"-?(0|[1-9][0-9]{0,5})"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
            },
            "required": ["city", "zip", "scores"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}

ARITH = r"""
start: expr
?expr: term (("+" | "-") term)*
?term: factor (("*" | "/") factor)*
?factor: INT | "(" expr ")"
%import common.INT
%ignore " "
"""

N = 50


def _walk_texts(cache, tokenizer, walk, kind, spec, seed, n=N, **kw):
    compiled = cache.compile(kind, spec)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        ids = walk(GrammarState(compiled), rng, **kw)
        texts.append(tokenizer.decode(ids, clean_up_tokenization_spaces=False))
    return texts


@pytest.mark.parametrize("regex", [IPV4, DATE, INT], ids=["ipv4", "date", "int"])
def test_regex_outputs_fullmatch(cache, tokenizer, walk, regex):
    texts = _walk_texts(cache, tokenizer, walk, "regex", regex, seed=1)
    for text in texts:
        assert re.fullmatch(regex, text), text
    assert len(set(texts)) > N // 2  # the walk explores, it is not stuck on one string


@pytest.mark.parametrize("dtype", ["int", "float", "bool", "str"])
def test_dtype_regexes(cache, tokenizer, walk, dtype):
    regex = DTYPE_REGEX[dtype]
    for text in _walk_texts(cache, tokenizer, walk, "regex", regex, seed=2, n=10):
        assert re.fullmatch(regex, text), text
        if dtype in ("int", "float"):
            {"int": int, "float": float}[dtype](text.strip())
        elif dtype == "bool":
            assert text in ("True", "False")


def test_json_schema_outputs_validate(cache, tokenizer, walk):
    jsonschema = pytest.importorskip("jsonschema")
    texts = _walk_texts(cache, tokenizer, walk, "json_schema", json.dumps(SCHEMA), seed=3)
    roles = set()
    for text in texts:
        obj = json.loads(text)
        jsonschema.validate(obj, SCHEMA)
        roles.add(obj["role"])
    assert roles == {"admin", "user", "guest"}


def test_lark_grammar_outputs_parse(cache, tokenizer, walk):
    lark = pytest.importorskip("lark")
    parser = lark.Lark(ARITH)
    texts = _walk_texts(cache, tokenizer, walk, "grammar", ARITH, seed=4, p_stop=0.7, max_tokens=400)
    for text in texts:
        parser.parse(text)  # raises on a string outside the grammar
    assert any(c in t for t in texts for c in "+-*/")
