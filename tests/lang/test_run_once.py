"""Issue 16: run / run_batch / compiled programs execute each program body exactly once (as
SGLang does), and states the body kept (fork branches) read their variables and meta info."""

import threading

import pytest

import sglite as sgl

from .fake_backend import FakeBackend


def make_counting_program():
    calls = {"n": 0}
    lock = threading.Lock()

    @sgl.function
    def prog(s, i, kept):
        with lock:
            calls["n"] += 1
        s += f"Item {i}: " + sgl.gen("a", max_tokens=4, temperature=0)
        forks = s.fork(2)
        forks += lambda j: f" branch {j}: " + sgl.gen("b", max_tokens=3, temperature=0)
        kept.extend(forks)

    return prog, calls


def check(kept, expected):
    assert len(kept) == expected
    for fork in kept:
        assert isinstance(fork["b"], str)
        assert "prompt_tokens" in fork.get_meta_info("b")
        assert fork["a"]  # inherited from the parent at the fork


@pytest.fixture
def fake():
    return FakeBackend()


def test_fake_run_batch_and_run_execute_each_body_once(fake):
    prog, calls = make_counting_program()
    kept = []
    states = prog.run_batch([{"i": i, "kept": kept} for i in range(16)], backend=fake)
    assert calls["n"] == 16 and all(s.error() is None for s in states)
    check(kept, 32)
    assert not any(k == "graph" for k, _ in fake.requests)
    kept2 = []
    prog.run(i=0, kept=kept2, backend=fake).sync()
    assert calls["n"] == 17
    check(kept2, 2)
    prog.compile(backend=fake).run(i=1, kept=kept2).sync()
    assert calls["n"] == 18
    check(kept2, 4)


def test_e2e_run_batch_and_run_execute_each_body_once(endpoint):
    prog, calls = make_counting_program()
    kept = []
    states = prog.run_batch([{"i": i, "kept": kept} for i in range(16)], backend=endpoint)
    assert calls["n"] == 16, calls
    assert all(s.error() is None for s in states), [s.error() for s in states]
    check(kept, 32)
    assert all(f.get_meta_info("b")["completion_tokens"] >= 1 for f in kept)
    kept2 = []
    state = prog.run(i=3, kept=kept2, backend=endpoint)
    state.sync()
    assert calls["n"] == 17
    check(kept2, 2)
