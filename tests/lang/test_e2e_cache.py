"""Prefix reuse seen from the frontend: fork branches and a 20-shot select batch."""

import pytest

import sglite as sgl
from sglite.lang.ir import GenParams

# ~300 tokens of varied text (SmolLM2's tokenizer: about 4.5 characters per token here).
PREFIX = "".join(f"Fact {i}: the number {i} squared is {i * i}, and {i} plus {i} is {2 * i}.\n"
                 for i in range(1, 21))


@sgl.function
def fork_after_prefix(s):
    s += PREFIX
    forks = s.fork(4)
    forks += lambda i: "Question " + str(i) + ": what is" + sgl.gen("x", max_tokens=2)


def prefix_tokens(endpoint) -> int:
    (_, meta), = endpoint.generate(PREFIX, GenParams(max_tokens=0))
    return meta["prompt_tokens"]


@pytest.mark.parametrize("mode", ["run", "run_batch"])
def test_fork_branches_reuse_the_prefix(endpoint, mode):
    num_prefix = prefix_tokens(endpoint)
    assert num_prefix >= 300
    endpoint.flush_cache()
    if mode == "run":
        state = fork_after_prefix.run(backend=endpoint, temperature=0)
        state.sync()
    else:  # run_batch runs the body eagerly too: the fork prefills its prefix once
        (state,) = fork_after_prefix.run_batch([{}], backend=endpoint, temperature=0)
    branches = state.executor.children
    assert len(branches) == 4
    for branch in branches:
        branch.get_var("x")  # forks run on their own threads: wait for each
        meta = branch.meta_info["x"]
        # The radix match may leave the prefix's last token to be recomputed.
        assert meta["cached_tokens"] >= num_prefix - 1, (mode, meta)


SHOTS = "Parity and size of numbers.\n" + "".join(
    f"{n}: {'even' if n % 2 == 0 else 'odd'} {'small' if n < 50 else 'big'}\n"
    for n in range(3, 83, 4))  # 20 short shots
LABELS = ["even small", "odd small", "even big", "odd big"]


@sgl.function
def few_shot_select(s, n):
    s += SHOTS + str(n) + ":"
    s += sgl.select("label", [" " + label for label in LABELS])


def test_20_shot_select_batch_hits_the_cache(endpoint):
    endpoint.flush_cache()
    states = few_shot_select.run_batch([{"n": n} for n in range(1, 41)], backend=endpoint)
    assert all(s.error() is None for s in states), [s.error() for s in states if s.error()]
    metas = [s.get_meta_info("label") for s in states]
    prompt = sum(m["prompt_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in metas)
    assert cached > 0.8 * prompt, (cached, prompt)
    assert all(s["label"].strip() in LABELS for s in states)
