"""GrammarCache errors and caching; batched bitmask fill/apply leaves unconstrained rows alone."""

import json

import pytest
import torch

from sglite.runtime.sampling.constrained import (
    GrammarState,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_bool,
    fill_bitmask,
)

VOCAB = 49152


@pytest.mark.parametrize(
    "kind, spec, words",
    [
        ("regex", "[0-9", ["invalid regex", "Unclosed '['"]),
        ("regex", "a(?=b)", ["invalid regex", "Lookahead"]),
        ("json_schema", "{", ["invalid JSON schema", "not valid JSON"]),
        ("json_schema", "[1, 2]", ["invalid JSON schema", "must be an object"]),
        ("json_schema", '{"properties": {"a": {"type": "strin"}}}', ["properties/a/type"]),
        ("grammar", "start: foo\n", ["invalid Lark grammar", "'foo'"]),
        ("grammar", 'start: "a" (\n', ["invalid Lark grammar", "parenthesis"]),
        ("grammar", 'expr: "a"\n', ["invalid Lark grammar", "start"]),
    ],
)
def test_bad_specs_raise_value_error_naming_the_problem(cache, kind, spec, words):
    fut = cache.get_future(kind, spec)
    with pytest.raises(ValueError) as info:
        fut.result(timeout=30)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_unknown_kind_raises_at_once(cache):
    with pytest.raises(ValueError, match="unknown grammar kind 'ebnf'"):
        cache.get_future("ebnf", "x")


def test_same_spec_shares_one_future(cache):
    a = cache.get_future("regex", "[a-c]{2}")
    assert cache.get_future("regex", "[a-c]{2}") is a
    assert cache.get_future("json_schema", '{"type": "integer"}') is not a
    state = GrammarState(a.result(timeout=30))
    allowed = bitmask_to_bool_row(state)
    assert allowed.sum() > 0 and not allowed[2]  # EOS not allowed before two letters


def bitmask_to_bool_row(state):
    mask = state.allowed_mask()
    assert mask.shape == (VOCAB,) and mask.dtype == torch.bool
    return mask


def test_batch_fill_and_apply_touch_only_constrained_rows(cache, tokenizer):
    digits = cache.compile("regex", "[0-9]+")
    schema = cache.compile("json_schema", json.dumps({"type": "object"}))
    states = [GrammarState(digits), None, GrammarState(schema), None]
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    bitmask = allocate_bitmask(4, VOCAB)
    rows = fill_bitmask(bitmask, states)
    assert rows == [0, 2]
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits[[1, 3]], before[[1, 3]])
    allowed = bitmask_to_bool(bitmask, VOCAB)
    for r in rows:
        assert torch.equal(allowed[r], states[r].allowed_mask())
        assert torch.equal(torch.isfinite(logits[r]), allowed[r])
        assert torch.equal(logits[r][allowed[r]], before[r][allowed[r]])
    # the argmax of a masked row is a token its grammar accepts
    for r in rows:
        tok = int(logits[r].argmax())
        assert states[r].accept(tok)
    text = tokenizer.decode([int(logits[0].argmax())])
    assert text.isdigit()


def test_apply_rejects_a_too_narrow_bitmask():
    with pytest.raises(ValueError, match="allocate the bitmask with the model's vocab_size"):
        apply_bitmask(torch.zeros(1, 100), allocate_bitmask(1, 32), [0])


def test_rollback_and_reset(cache, tokenizer):
    state = GrammarState(cache.compile("regex", "ab+c"))
    ids = tokenizer.encode("abbb", add_special_tokens=False)
    assert state.accept_many(ids) and state.num_accepted == len(ids)
    bad = tokenizer.encode("x", add_special_tokens=False)
    assert not state.accept_many(ids[:0] + bad) and state.num_accepted == len(ids)
    state.rollback(len(ids))
    assert state.num_accepted == 0 and state.accept_many(ids)
    with pytest.raises(ValueError, match="cannot roll back"):
        state.rollback(len(ids) + 1)
    state.reset()
    assert state.num_accepted == 0 and not state.is_completed()


@pytest.mark.parametrize("rows_kind", ["every row", "some rows", "row tensor"])
def test_torch_apply_matches_xgrammars_kernel(cache, rows_kind):
    """The device path (unpack + masked_fill, run here on CPU tensors) masks exactly what
    xgrammar's own apply does, with the same padded-vocab rule and untouched other rows."""
    from sglite.runtime.sampling.constrained.state import _apply_on_device

    digits = cache.compile("regex", "[0-9]+")
    states = [GrammarState(digits), GrammarState(cache.compile("regex", "[a-c]{2}")), None]
    if rows_kind == "every row":
        states = states[:2]
    bitmask = allocate_bitmask(len(states), VOCAB)
    bitmask[-1] = 12345  # a stale row fill_bitmask leaves alone must not be applied
    rows = fill_bitmask(bitmask, states)
    with torch.inference_mode():  # as the forward's logits are
        logits = torch.randn(len(states), VOCAB)
    want = logits.clone()
    apply_bitmask(want, bitmask, rows)  # xgrammar's CPU kernel
    _apply_on_device(logits, bitmask, torch.tensor(rows) if rows_kind == "row tensor" else rows)
    assert torch.equal(logits, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_on_cuda_matches_cpu(cache):
    states = [GrammarState(cache.compile("regex", "[0-9]+")), None]
    bitmask = allocate_bitmask(2, VOCAB)
    rows = fill_bitmask(bitmask, states)
    cpu = torch.randn(2, VOCAB)
    gpu = cpu.cuda()
    apply_bitmask(cpu, bitmask, rows)
    apply_bitmask(gpu, bitmask, rows)
    assert torch.equal(gpu.cpu(), cpu)


def test_padded_vocab_rows_are_never_allowed(tokenizer):
    from sglite.runtime.sampling.constrained import GrammarCache

    padded = VOCAB + 64  # models pad lm_head past the tokenizer's vocabulary
    cache = GrammarCache(tokenizer, padded, stop_token_ids=[2])
    try:
        state = GrammarState(cache.compile("regex", "[a-z ]+"))
        mask = state.allowed_mask()
        assert mask.shape == (padded,) and mask[:VOCAB].any() and not mask[VOCAB:].any()
        logits = torch.zeros(1, padded)
        bitmask = allocate_bitmask(1, padded)
        apply_bitmask(logits, bitmask, fill_bitmask(bitmask, [state]))
        assert torch.isinf(logits[0, VOCAB:]).all()
    finally:
        cache.shutdown()


def test_bounded_json_strings_follow_json_rules(cache, tokenizer):
    """xgrammar's own rule for a maxLength string admits raw control characters (invalid JSON);
    the cache's does not."""
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "string", "maxLength": 3}},
                         "required": ["n"]})
    compiled = cache.compile("json_schema", schema)

    def accepts(text):
        state = GrammarState(compiled)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return state.accept_many(ids) and state.is_completed()

    assert accepts('{"n": "abc"}') and accepts('{"n": "é"}')
    assert not accepts('{"n": "a\x1eb"}') and not accepts('{"n": "a\tb"}')
    assert not accepts('{"n": "abcd"}')


def test_fill_split_over_threads_matches_one_thread(cache, tokenizer):
    """Rows shared among threads (each its own single-threaded xgrammar matcher) fill exactly the
    bitmask one thread fills, rows of unconstrained requests untouched."""
    from sglite.runtime.sampling.constrained.state import ROWS_PER_FILL_THREAD, _Filler

    grammars = [cache.compile("regex", "[0-9]+"), cache.compile("regex", "[a-c]{2,5}x"),
                cache.compile("json_schema", json.dumps({"type": "object"}))]
    n = 3 * ROWS_PER_FILL_THREAD + 5
    states = [GrammarState(grammars[i % 3]) for i in range(n)]
    for i, s in enumerate(states):  # different states within each grammar
        if i % 3 == 1 and i % 2:
            assert s.accept_many(tokenizer.encode("ab", add_special_tokens=False))
    rows = [i for i in range(n) if i % 7]  # some rows unconstrained
    one, split = allocate_bitmask(n, VOCAB), allocate_bitmask(n, VOCAB)
    one[0] = split[0] = 77
    _Filler(1).fill([states[i].matcher for i in rows], one, rows)
    _Filler(3).fill([states[i].matcher for i in rows], split, rows)
    assert torch.equal(one, split) and int(split[0, 0]) == 77


def test_fill_thread_count_from_the_environment(monkeypatch):
    from sglite.runtime.sampling.constrained.state import fill_threads

    monkeypatch.setenv("SGLITE_GRAMMAR_FILL_THREADS", "3")
    assert fill_threads() == 3
    for bad in ("auto", "0", "-2"):
        monkeypatch.setenv("SGLITE_GRAMMAR_FILL_THREADS", bad)
        with pytest.raises(ValueError, match="SGLITE_GRAMMAR_FILL_THREADS"):
            fill_threads()
    monkeypatch.delenv("SGLITE_GRAMMAR_FILL_THREADS")
    for cpus, threads in ((1, 1), (2, 1), (8, 4), (16, 8), (64, 8)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert fill_threads() == threads
