"""Mask-fill time of regex grammars with bounded repetitions, as xgrammar compiles them (`X{m,n}`,
the baseline) beside the same grammars with the repetitions written out (`[a-z]{2,4}` ->
`[a-z] [a-z] [a-z]? [a-z]?`, each optional its own expression, a rule name only where its body is
one class or string; the forms sharing one rule across the copies or nesting the optionals
were slower still):
256 matchers per regex walk to the end, one random allowed token a step (seeded; the benchmark's
greedy gens on random weights pick as arbitrarily), all rows filled in one xgrammar call on one
thread, as the runtime fills them. An experiment the runtime does not adopt (docs/benchmarks.md,
issue 15): written out, some regexes fill 10-40x faster, others 4x slower, and the compile grows
with the bound (`[A-Za-z ]{5,30}`: 14.5 s instead of 0.2 s on 2 CPUs).

    python bench/ebnf_repeats.py --model .benchmodel      # any machine; the folder's tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import xgrammar as xgr
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.grammar_fill_threads import walk  # noqa: E402
from bench.structured import REGEX  # noqa: E402

REGEXES = [
    REGEX,
    r"[A-Z][a-z]{3,12}, [A-Z][a-z]{3,12}",
    r"\w{2,16}@[a-z]{2,10}\.(com|org)",
    r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)",
    r"(0|[1-9][0-9]{0,6})(\.[0-9]{1,4})?",
    r"[A-Za-z ]{5,30}\.",
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}",
]
# bounds of 8 at most (--max-bound 8: whether a small-bound rule would be a safe rewrite)
SMALL_BOUND_REGEXES = [
    r"[a-z]{3,6}@[a-z]{2,5}\.com",
    r"[A-Z]{2}\d{2} [A-Z]{1,3}",
    r"\w{1,8}",
    r"[a-z]{1,8} [a-z]{1,8} [a-z]{1,8}",
    r"(yes|no), [a-z ]{2,8}\.",
    r"[A-Z][a-z]{1,7}-[A-Z][a-z]{1,7}",
    r"\d{1,3}(,\d{3}){0,2}",
    r"[0-9a-f]{8}-[0-9a-f]{4}",
    r"[A-Za-z]{4,8}[0-9]{2}",
]


MAX_EXPANDED = 32  # the largest upper bound written out

_TOKEN = re.compile(
    r'(?P<string>"(?:\\.|[^"\\])*")'
    r"|(?P<cls>\[(?:\\.|[^\]\\])*\])"
    r"|(?P<rep>\{\s*(?P<lo>\d+)\s*(?:,\s*(?P<hi>-?\d+)\s*)?\})"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<open>\()|(?P<close>\))"
    r"|(?P<other>\s+|.)",
    re.S,
)


_RULE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*::=\s*(.*?)\s*$", re.M)
_SIMPLE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]', re.S)


def expand_bounded_repeats(ebnf: str, max_bound: int = MAX_EXPANDED) -> str:
    """ebnf with every `atom{m,n}` (atom: a string or character class, or the name of a rule that
    is one; 0 < n <= max_bound) replaced by its sequence. Other text is kept as is."""
    simple = {name: body for name, body in ((m.group(1), _strip_parens(m.group(2)))
                                            for m in _RULE.finditer(ebnf))
              if _SIMPLE.fullmatch(body)}
    groups: list[list[str]] = [[]]  # output pieces of each open parenthesis, outermost first
    last_atom = [False]  # per group: its last piece is an atom a repetition may apply to
    for m in _TOKEN.finditer(ebnf):
        text = m.group(0)
        if m.group("rep") is not None:
            lo = int(m.group("lo"))
            hi = lo if m.group("hi") is None else int(m.group("hi"))
            atom = groups[-1][-1] if last_atom[-1] else ""
            atom = simple.get(atom, _strip_parens(atom))
            if _SIMPLE.fullmatch(atom) and 0 <= lo <= hi <= max_bound and hi > 0:
                groups[-1][-1] = _sequence(atom, lo, hi)
            else:
                groups[-1].append(text)
            last_atom[-1] = False
        elif m.group("open") is not None:
            groups.append([text])
            last_atom.append(False)
        elif m.group("close") is not None and len(groups) > 1:
            inner = groups.pop() + [text]
            last_atom.pop()
            groups[-1].append("".join(inner))
            last_atom[-1] = True
        else:
            groups[-1].append(text)
            last_atom[-1] = m.group("other") is None
    while len(groups) > 1:  # unbalanced: leave it for xgrammar to reject
        inner = groups.pop()
        groups[-1].append("".join(inner))
    return "".join(groups[0])


def _sequence(atom: str, lo: int, hi: int) -> str:
    return " ".join([atom] * lo + [atom + "?"] * (hi - lo))


def _strip_parens(body: str) -> str:
    """`(([a-z]))` -> `[a-z]`: the outer parentheses xgrammar prints around a rule's body."""
    while body.startswith("(") and body.endswith(")") and _balanced(body[1:-1]):
        body = body[1:-1].strip()
    return body


def _balanced(text: str) -> bool:
    depth = 0
    for m in _TOKEN.finditer(text):
        if m.group("open") is not None:
            depth += 1
        elif m.group("close") is not None:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a folder with a tokenizer and config.json")
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--max-bound", type=int, default=MAX_EXPANDED, help="the largest upper bound written out")
    ap.add_argument("--small-bounds", action="store_true",
                    help="the benchmark's regex and SMALL_BOUND_REGEXES instead of REGEXES")
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab),
                                   max_threads=1, cache_enabled=False)
    print(f"host: {os.cpu_count()} CPUs, batch {args.bs}, one fill thread")
    print("| regex | form | compile ms | steps | longest fill ms | all fills ms | all fills, "
          "xgrammar's form | speed-up |\n|---|---|---|---|---|---|---|---|")
    for regex in [REGEX, *SMALL_BOUND_REGEXES] if args.small_bounds else REGEXES:
        ebnf = str(xgr.Grammar.from_regex(regex))
        base = None
        for form, text in (("xgrammar's X{m,n}", ebnf), ("written out", expand_bounded_repeats(ebnf, args.max_bound))):
            t = time.perf_counter()
            compiled = compiler.compile_grammar(text)
            compile_ms = (time.perf_counter() - t) * 1e3
            fill = xgr.BatchGrammarMatcher(max_threads=1).batch_fill_next_token_bitmask
            times = walk(compiled, vocab, fill, args.bs, 64, seed=0)
            total = sum(times) * 1e3
            base = total if base is None else base
            print(f"| `{regex}` | {form} | {compile_ms:.0f} | {len(times)} | {max(times) * 1e3:.1f} | "
                  f"{total:.1f} | {base:.1f} | {base / total:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
