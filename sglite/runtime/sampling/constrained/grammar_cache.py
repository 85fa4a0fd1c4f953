"""Compile regex / JSON-schema / Lark grammars into xgrammar token automata, off the scheduler loop.

Compilation of a JSON schema or grammar takes milliseconds to seconds (xgrammar precomputes token
masks per automaton state), so the scheduler asks for a Future and keeps decoding other requests;
a request whose grammar is not ready yet simply waits in the queue. Results (and errors) are cached
by (kind, spec): the same `gen(regex=...)` in a batch of 1000 programs compiles once.

Kinds:
- "regex": xgrammar's regex dialect (no lookaround, no backrefs, no \\p{..}).
- "json_schema": a JSON string. It is parsed with `json.loads` and, when `jsonschema` is installed,
  checked against its meta-schema, then compiled; objects are compact (`, ` and `: `, no newlines)
  unless `json_any_whitespace=True`, because a small model given free whitespace can loop on it.
- "grammar": Lark's EBNF. `lark.Lark(spec)` parses it first (its errors are the clearest about
  syntax and undefined names), then xgrammar's own Lark front end (`compile_lark`, xgrammar >= 0.2)
  translates it: rules, terminals, literals, /regexp/ terminals, ?, *, +, ~ n, alternatives,
  groups, `%import common.X`, and `%ignore` (an optional run of the ignored terminals after each
  terminal). The entry rule must be called `start`. Lark's lexer semantics (longest match,
  terminal priorities) become a character-level CFG, so a grammar that relies on a keyword
  winning over an identifier pattern admits both readings.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import xgrammar as xgr

logger = logging.getLogger("sglite.runtime")

KINDS = ("regex", "json_schema", "grammar")

# xgrammar's C++ errors start with "[08:58:41] /project/cpp/regex_converter.cc:83: "; users want
# only the part after it.
_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """What a GrammarCache future resolves to; GrammarState(compiled) matches against it."""

    kind: str
    spec: str
    xgr_grammar: xgr.CompiledGrammar
    token_bytes: list[bytes]  # token id -> its bytes as the matcher sees them (shared, read-only)
    vocab_size: int


class GrammarCache:
    """Per-runtime compiler + cache. One per tokenizer; thread-safe `get_future`."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        num_threads: int = 2,
        stop_token_ids: Sequence[int] | None = None,
        json_any_whitespace: bool = False,
        max_entries: int = 1024,
    ):
        # vocab_size is the model's logits width (may exceed len(tokenizer): padded lm_head rows);
        # the bitmask covers all of it and padded ids are never allowed.
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        _warn_if_slow_xgrammar()
        stop = list(stop_token_ids) if stop_token_ids else None
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop
        )
        self.vocab_size = vocab_size
        # Built once here: xgrammar rebuilds this 49k-entry list on every decoded_vocab access.
        self.token_bytes: list[bytes] = list(self.tokenizer_info.decoded_vocab)
        self.json_any_whitespace = json_any_whitespace
        self.max_entries = max_entries
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=num_threads)
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="grammar")
        self._futures: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()

    def get_future(self, kind: str, spec: str) -> Future:
        """Future resolving to a CompiledGrammar, or raising ValueError that names the
        kind and the problem. Unknown kinds raise ValueError right away."""
        if kind not in KINDS:
            raise ValueError(f"unknown grammar kind {kind!r}: expected one of {KINDS}")
        if not isinstance(spec, str):
            raise ValueError(f"{kind} must be a string, got {type(spec).__name__}")
        key = (kind, spec)
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None:
                self._futures.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, kind, spec)
            self._futures[key] = fut
            if len(self._futures) > self.max_entries:
                self._futures.popitem(last=False)
            return fut

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Blocking form of get_future (tests, offline use)."""
        return self.get_future(kind, spec).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        if kind == "json_schema":
            _check_json_schema(spec)
        elif kind == "grammar":
            _check_lark(spec)
        try:
            if kind == "regex":
                grammar = self._compiler.compile_regex(spec)
            elif kind == "json_schema":
                ebnf = str(xgr.Grammar.from_json_schema(spec, any_whitespace=self.json_any_whitespace))
                grammar = self._compiler.compile_grammar(_strict_json_strings(ebnf))
            else:
                grammar = self._compiler.compile_lark(spec)
        except RuntimeError as e:
            raise ValueError(f"invalid {_NAMES[kind]} {_short(spec)}: {_clean(e)}") from None
        return CompiledGrammar(kind, spec, grammar, self.token_bytes, self.vocab_size)


def _warn_if_slow_xgrammar() -> None:
    """pyproject asks for xgrammar >= 0.2.9; an environment holding an older one (an image's own
    wheel) still runs, 100x slower on a JSON batch's first fills (docs/benchmarks.md, issue 15)."""
    from importlib import metadata

    try:
        version = metadata.version("xgrammar")
    except metadata.PackageNotFoundError:
        return
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3])
    if parts < (0, 2, 9):
        logger.warning("xgrammar %s: versions before 0.2.9 take 0.4-1.6 s for a 256-row JSON batch's "
                       "first mask fills (3-8 ms in 0.2.9); pip install 'xgrammar>=0.2.9'", version)


# xgrammar (0.2.9) spells a length-bounded JSON string's character as [^"\\\r\n]: raw control
# characters pass, which makes invalid JSON (json.loads rejects "\x1e" inside a string). Exclude
# them as its unbounded strings do. (Admitting escapes there too, `| "\\" ...`, made the mask
# fill some 300x slower: 76.7 ms instead of 0.23 ms per step for 64 rows, bench/grammar_fill.py;
# bounded strings stay escape-free, as xgrammar has them.)
_BOUNDED_CHAR = r'[^\"\\\r\n]'
_JSON_CHAR = r'[^\0-\x1f\"\\]'


def _strict_json_strings(ebnf: str) -> str:
    return ebnf.replace(_BOUNDED_CHAR, _JSON_CHAR)


_NAMES = {"regex": "regex", "json_schema": "JSON schema", "grammar": "Lark grammar"}


def _check_json_schema(spec: str) -> None:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON schema {_short(spec)}: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(
            f"invalid JSON schema {_short(spec)}: must be an object or a boolean, "
            f"got {type(schema).__name__}"
        )
    try:
        import jsonschema
    except ImportError:  # optional: xgrammar still rejects what it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(
            f"invalid JSON schema {_short(spec)}: at {where}: {e.message}"
        ) from None


def _check_lark(spec: str) -> None:
    import lark

    try:
        lark.Lark(spec, start="start")
    except (lark.exceptions.LarkError, re.error) as e:
        msg = str(e).strip()
        if "NonTerminal('start')" in msg:
            msg = "no `start` rule (the entry rule must be called start)"
        raise ValueError(f"invalid Lark grammar: {msg}") from None


def _clean(e: Exception) -> str:
    return _XGR_PREFIX.sub("", str(e).strip())


def _short(spec: str, limit: int = 80) -> str:
    return repr(spec if len(spec) <= limit else spec[:limit] + "...")
