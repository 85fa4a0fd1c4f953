"""`gen(dtype=...)` → the regex that constrains the generation.

Plain Python (no torch, no xgrammar) so that the frontend can import or copy it. The regexes mirror
SGLang's `sglang/lang/ir.py` (REGEX_INT / REGEX_FLOAT / REGEX_BOOL / REGEX_STR). The trailing
`[ \\n]*` on numbers is SGLang's: it lets the model end a number with whitespace instead of being
forced to emit EOS right after a digit; strip the text before `int()` / `float()` (both accept
surrounding whitespace anyway).
"""

from __future__ import annotations

REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
# SGLang restricts strings to word characters and whitespace (no escapes, no quotes inside).
REGEX_STR = r"\"[\w\d\s]*\""

DTYPE_REGEX: dict[str, str] = {
    "int": REGEX_INT,
    "float": REGEX_FLOAT,
    "bool": REGEX_BOOL,
    "str": REGEX_STR,
}


def dtype_to_regex(dtype: str | type) -> str:
    """`int` / "int" (also float, bool, str) → its regex; anything else → ValueError."""
    name = dtype.__name__ if isinstance(dtype, type) else dtype
    try:
        return DTYPE_REGEX[name]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}: expected one of {sorted(DTYPE_REGEX)}"
        ) from None
