"""Jump-forward: forced strings are appended, re-tokenized at the boundary, and stay consistent."""

import json
import random

from sglite.runtime.sampling.constrained import GrammarState, jump_forward

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "city": {"enum": ["Paris", "Berlin"]},
        },
        "required": ["name", "age", "city"],
    }
)


def _bytes(cache, ids):
    table = cache.token_bytes
    return b"".join(table[t] for t in ids)


def _generate(cache, tokenizer, walk_step, *, seed):
    """Alternate jump-forward and one random allowed token until the grammar completes."""
    state = GrammarState(cache.compile("json_schema", SCHEMA))
    rng = random.Random(seed)
    out, forced, num_jumped = [], [], 0
    while not state.is_completed():
        old = _bytes(cache, out)
        jf = jump_forward(state, tokenizer, out)
        if jf is not None:
            kept = out[: len(out) - jf.num_dropped]
            out = kept + jf.new_token_ids
            assert _bytes(cache, out) == old + jf.text.encode()
            assert state.num_accepted == len(out)
            forced.append(jf.text)
            num_jumped += jf.num_jumped
            continue
        out.append(walk_step(state, rng))
    return out, forced, num_jumped, state


def test_forced_keys_appear_and_retokenization_is_accepted(cache, tokenizer, walk_step):
    def step(state, rng):
        return walk_step(state, rng, p_stop=0.0)  # stop only matters after completion

    for seed in range(5):
        out, forced, num_jumped, state = _generate(cache, tokenizer, step, seed=seed)
        text = tokenizer.decode(out, clean_up_tokenization_spaces=False)
        obj = json.loads(text)
        assert list(obj) == ["name", "age", "city"] and obj["city"] in ("Paris", "Berlin")
        assert forced[0] == '{"name": "'
        assert any('"age": ' in f for f in forced) and any('"city": "' in f for f in forced)
        assert num_jumped >= 8  # most of the structure came without decode steps
        # replaying the final ids on a fresh matcher accepts them all
        fresh = GrammarState(state.compiled)
        assert fresh.accept_many(out) and fresh.is_completed()


def test_boundary_tokens_are_merged_like_the_tokenizer_does(cache, tokenizer):
    # After the model closes the name with `"`, the forced `, "age": ` makes `",` one token.
    state = GrammarState(cache.compile("json_schema", SCHEMA))
    out = tokenizer.encode('{"name": "Bob"', add_special_tokens=False)
    assert state.accept_many(out)
    jf = jump_forward(state, tokenizer, out)
    assert jf is not None and jf.text == ', "age": '
    new = out[: len(out) - jf.num_dropped] + jf.new_token_ids
    expected = tokenizer.encode('{"name": "Bob", "age": ', add_special_tokens=False)
    assert new == expected
    assert jf.num_dropped >= 1  # the lone `"` token was replaced


def test_nothing_forced_returns_none(cache, tokenizer):
    state = GrammarState(cache.compile("regex", "[0-9]+"))
    assert jump_forward(state, tokenizer, []) is None
    done = GrammarState(cache.compile("regex", "ok"))
    ids = tokenizer.encode("ok", add_special_tokens=False)
    assert done.accept_many(ids) and done.accept(2) and done.is_terminated()
    assert jump_forward(done, tokenizer, ids) is None
