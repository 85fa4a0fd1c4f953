"""Cheap checks the handlers run before any heavy per-request work (issue 20, item 6).

- Prompt size before tokenizing: a token never covers more characters than the longest entry in
  the vocabulary, so a text of `n` characters has at least n / longest tokens; one far past the
  context is refused without being tokenized (an 18 MB prompt used to hold the loop ~10 s).
- Nesting of JSON schemas and Lark grammars before they are compiled: the compilers recurse per
  level and fail deep inputs with a bare "maximum recursion depth exceeded".
- The request id of a message that cannot be decoded (invalid UTF-8 elsewhere in it, a wrong
  type), so that its error reaches a client that matches replies by id.
"""

from __future__ import annotations

import re

MAX_GRAMMAR_NESTING = 100  # brackets; 99 deep compiles in ~0.1 s, a few hundred overflow the stack


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry (byte-level BPE spells a byte per character,
    so this also bounds the bytes of text one token covers)."""
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) or 1


def json_nesting(text: str) -> int:
    """Deepest [ / { nesting of a JSON text, strings skipped (no parse, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


_LARK_SKIP = re.compile(r'"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/[imslux]*|//[^\n]*')


def lark_nesting(text: str) -> int:
    """Deepest ( [ { nesting of a Lark grammar outside its string and regex literals and
    comments."""
    depth = deepest = 0
    for ch in _LARK_SKIP.sub(" ", text):
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


def check_grammar_nesting(json_schema: str | None, grammar: str | None) -> None:
    for name, spec, measure in (("json_schema", json_schema, json_nesting),
                                ("grammar", grammar, lark_nesting)):
        if spec is not None and (depth := measure(spec)) > MAX_GRAMMAR_NESTING:
            raise ValueError(f"{name} is nested {depth} levels deep; at most "
                             f"{MAX_GRAMMAR_NESTING} levels are supported")


# a msgpack str header after the key "rid": fixstr, str8, str16
_RID = re.compile(rb"\xa3rid(?:([\xa0-\xbf])|\xd9(.)|\xda(..))", re.DOTALL)


def recover_rid(data: bytes) -> str:
    """The request id of an undecodable message, found by its key in the raw bytes ("" if none);
    invalid UTF-8 inside the id is replaced."""
    m = _RID.search(data)
    if m is None:
        return ""
    if m.group(1) is not None:
        n = m.group(1)[0] - 0xA0
    elif m.group(2) is not None:
        n = m.group(2)[0]
    else:
        n = int.from_bytes(m.group(3), "big")
    raw = data[m.end():m.end() + n]
    return raw.decode("utf-8", errors="replace") if len(raw) == n else ""
