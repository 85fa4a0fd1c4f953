"""Constrained decoding: regex / JSON schema / Lark grammar → per-step token bitmasks (xgrammar),
plus jump-forward over forced text. See grammar_cache.py, state.py, jump.py.
(`gen(dtype=...)` becomes a regex in the frontend: sglite/lang/ir.py.)

Names are loaded lazily: importing the package loads neither torch nor xgrammar."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "KINDS": "grammar_cache",
    "GrammarCache": "grammar_cache",
    "CompiledGrammar": "grammar_cache",
    "JumpForward": "jump",
    "jump_forward": "jump",
    "GrammarState": "state",
    "accept_tokens": "state",
    "allocate_bitmask": "state",
    "apply_bitmask": "state",
    "bitmask_to_bool": "state",
    "fill_bitmask": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
