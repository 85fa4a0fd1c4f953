"""Shared fixtures: the embedded model's real tokenizer (the runtime's own) and one GrammarCache."""

import random

import numpy as np
import pytest

SMOLLM2_VOCAB = 49152
IM_END = 2  # <|im_end|>: the instruct model's end-of-turn token


@pytest.fixture(scope="session")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="session")
def cache(tokenizer):
    from sglite.runtime.sampling.constrained import GrammarCache

    c = GrammarCache(tokenizer, SMOLLM2_VOCAB, stop_token_ids=[IM_END])
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def punct(cache):
    """bool [vocab]: tokens that close something: one of `"` `]` `}` `)` `,`."""
    table = cache.token_bytes
    marks = set(b'"]}),')
    return np.array([len(b) == 1 and b[0] in marks for b in table])


def _random_step(state, rng: random.Random, punct, *, p_stop=0.5, p_punct=0.2) -> int:
    """Pick and accept one token the mask allows, like a model would. The stop token is taken
    with probability p_stop when allowed; else, with probability p_punct, an allowed closing
    token (so that walks through unbounded strings and numbers end in tens of tokens, not
    thousands); else uniformly among all allowed."""
    # numpy, not torch: torch's any()/nonzero() on a 49k mask cost ~10 ms on a loaded 2-core box
    allowed = state.allowed_mask().numpy()
    ids = np.flatnonzero(allowed)
    assert len(ids), "the grammar allows no token before terminating"
    if allowed[IM_END] and (rng.random() < p_stop or len(ids) == 1):
        tok = IM_END
    else:
        ids = ids[ids != IM_END]
        closers = ids[punct[ids]]
        if len(closers) and rng.random() < p_punct:
            ids = closers
        tok = int(ids[rng.randrange(len(ids))])
    assert state.accept(tok), f"matcher rejected token {tok} that its own mask allowed"
    return tok


def _random_walk(state, rng: random.Random, punct, *, max_tokens=300, **kw) -> list[int]:
    """Random steps until the state terminates; the output ids without the stop token. Fails
    the test if the walk does not terminate within max_tokens."""
    out = []
    for _ in range(max_tokens):
        if state.is_terminated():
            return out
        tok = _random_step(state, rng, punct, **kw)
        if tok != IM_END:
            out.append(tok)
    raise AssertionError(f"walk did not terminate within {max_tokens} tokens")


@pytest.fixture(scope="session")
def walk(punct):
    """random_walk with the vocabulary's punctuation table bound: walk(state, rng, **kw)."""
    return lambda state, rng, **kw: _random_walk(state, rng, punct, **kw)


@pytest.fixture(scope="session")
def walk_step(punct):
    """_random_step with the punctuation table bound: walk_step(state, rng, **kw) -> token id."""
    return lambda state, rng, **kw: _random_step(state, rng, punct, **kw)
