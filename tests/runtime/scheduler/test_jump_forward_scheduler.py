"""Constrained decoding inside the Scheduler, in process on the embedded model.

Jump-forward: the KV accounting holds after every step while forced tokens replace sampled ones
(inside and outside the radix tree), the streamed text equals the decode of the final tokens, and
the grammar accepts those tokens. The overlapped loop: constrained rows decode in it (masks filled
while the forward runs), with the plain loop's tokens, and plain rows of a mixed batch get the
tokens they get alone."""

import json

import pytest

from sglite.protocol import parse_sampling_params
from sglite.runtime.scheduler.req import Req
from tests.runtime.scheduler.sinks import RecordingSink

SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"],
})


@pytest.fixture(scope="module")
def runner():
    import torch

    from sglite.runtime.executor.model_runner import ModelRunner

    # one thread: OpenMP spin-waits make two threads several times slower on a busy 2-core box
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # fp32: the plain rows of a mixed batch must not depend on the batch's composition
    yield ModelRunner(None, dtype="float32", max_total_tokens=1024, max_running_requests=8)
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def grammar_cache(runner):
    from sglite.runtime.sampling.constrained import GrammarCache

    cache = GrammarCache(runner.tokenizer, runner.model_config.vocab_size,
                         stop_token_ids=runner.model_config.eos_token_ids)
    yield cache
    cache.shutdown()


def _run(runner, grammar_cache, *, jump: bool, stream: bool, n: int = 3, min_per_row: float = 0,
         overlap: bool = True, plain: int = 0, stats: dict | None = None):
    """n JSON-schema requests and `plain` unconstrained ones (prompts told apart by their number)."""
    from sglite.runtime.scheduler.scheduler import Scheduler

    sched = Scheduler(runner, grammar_cache=grammar_cache, enable_jump_forward=jump,
                      log_interval=0, enable_overlap=overlap)
    sched.jump_min_tokens_per_row = min_per_row  # 0: every forced text jumps
    truncations = []  # (new_kv_len, tree_len) of every truncate that freed something
    real_truncate = sched.cache.truncate

    def truncate(req, new_kv_len):
        if new_kv_len < req.kv_len:
            truncations.append((new_kv_len, req.tree_len))
        real_truncate(req, new_kv_len)

    sched.outputs.truncate_kv = truncate
    reqs = []
    for i in range(n):
        ids = runner.tokenizer(f"The pet owner {i} as JSON:\n").input_ids
        params = parse_sampling_params({"temperature": 0, "max_new_tokens": 64,
                                        "json_schema": SCHEMA})
        reqs.append(Req(rid=str(i), input_ids=ids, params=params, sink=RecordingSink(), stream=stream))
        sched.outputs.init_request(reqs[-1])
        sched.add_request(reqs[-1])
    for i in range(plain):
        ids = runner.tokenizer(f"Story number {i}:").input_ids
        params = parse_sampling_params({"temperature": 0, "max_new_tokens": 24})
        reqs.append(Req(rid=f"plain{i}", input_ids=ids, params=params, sink=RecordingSink()))
        sched.outputs.init_request(reqs[-1])
        sched.add_request(reqs[-1])
    for req in reqs[:n]:  # compiled off the loop; don't spin the scheduler against the compiler
        req.grammar_future.result()
    while sched.has_work:
        sched.step()
        if stats is not None and sched._pending is not None:
            stats["constrained_pending"] = stats.get("constrained_pending", 0) + any(
                r.grammar is not None for r in sched._pending.reqs)
            stats["stale"] = stats.get("stale", 0) + (sched._pending.stale is not None)
        sched.cache.check_integrity()
    assert sched.cache.num_held == 0 and sched.cache.flush()
    return reqs, truncations


def test_jumps_keep_kv_text_and_grammar_consistent(runner, grammar_cache):
    from sglite.runtime.sampling.constrained import GrammarState

    reqs, truncations = _run(runner, grammar_cache, jump=True, stream=True)
    assert truncations, "re-tokenization never replaced a token that had KV"
    assert any(new < tree for new, tree in truncations), "no truncation reached into the tree"
    for req in reqs:
        sink = req.sink
        assert sink.error is None and sink.finished
        assert sink.meta["finish_reason"]["type"] == "stop"
        assert sink.meta["jump_forward_tokens"] > 0
        assert sink.text == runner.tokenizer.decode(req.output_ids, skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False)
        assert set(json.loads(sink.text)) == {"name", "age", "pets"}
        fresh = GrammarState(req.grammar.compiled)
        assert fresh.accept_many(req.output_ids) and fresh.is_terminated()


def test_without_jumps_every_token_is_decoded(runner, grammar_cache):
    reqs, truncations = _run(runner, grammar_cache, jump=False, stream=False, n=1)
    assert truncations == []
    (req,) = reqs
    assert "jump_forward_tokens" not in req.sink.meta
    assert set(json.loads(req.sink.text)) == {"name", "age", "pets"}


def _check_json(runner, req):
    from sglite.runtime.sampling.constrained import GrammarState

    assert req.sink.error is None and req.sink.meta["finish_reason"]["type"] == "stop"
    assert set(json.loads(req.sink.text)) == {"name", "age", "pets"}
    fresh = GrammarState(req.grammar.compiled)
    assert fresh.accept_many(req.output_ids) and fresh.is_terminated()


def test_constrained_rows_decode_in_the_overlapped_loop(runner, grammar_cache):
    stats = {}
    on, _ = _run(runner, grammar_cache, jump=True, stream=False, n=3, plain=2, stats=stats)
    assert stats.get("constrained_pending", 0) >= 5, "constrained rows left the overlapped loop"
    assert stats.get("stale", 0) > 0, "no jump-forward voided a row launched ahead"
    off, _ = _run(runner, grammar_cache, jump=True, stream=False, n=3, plain=2, overlap=False)
    alone, _ = _run(runner, grammar_cache, jump=True, stream=False, n=0, plain=2)
    for a, b in zip(on, off):
        assert a.output_ids == b.output_ids, a.rid
    for a, b in zip(on[3:], alone):  # the plain rows of the mixed batch
        assert a.output_ids == b.output_ids and a.sink.text == b.sink.text, a.rid
    for req in on[:3]:
        _check_json(runner, req)


def test_large_batches_decode_short_forced_text(runner, grammar_cache):
    """A forced text gaining fewer tokens than jump_min_tokens_per_row x the running requests
    is decoded step by step (a jump would cost every running request an extend forward); the
    text forced before the prompt's prefill still jumps (free: it joins the prefill)."""
    reqs, truncations = _run(runner, grammar_cache, jump=True, stream=False, n=3, min_per_row=100)
    every, _ = _run(runner, grammar_cache, jump=True, stream=False, n=3, min_per_row=0)
    assert truncations == []
    for req, other in zip(reqs, every):
        jumped = req.sink.meta.get("jump_forward_tokens", 0)
        assert 0 < jumped < other.sink.meta["jump_forward_tokens"]
        _check_json(runner, req)


def test_a_queued_grammar_request_aborted_during_the_poll_is_skipped(runner, grammar_cache):
    """A reply sent while the grammars are polled may end other queued grammar requests (a sink's
    on_error may abort; client_gone did, before sends deferred it): the poll skips them instead of
    failing the loop (the wire fuzz test's runtime died of it: list.remove of a request no longer
    queued)."""
    from concurrent.futures import Future

    from sglite.runtime.scheduler.req import ReqState
    from sglite.runtime.scheduler.scheduler import Scheduler

    sched = Scheduler(runner, grammar_cache=grammar_cache, log_interval=0)
    bad, good = Future(), Future()
    bad.set_exception(ValueError("bad regex"))
    good.set_result(grammar_cache.get_future("regex", "[ab]+").result())
    reqs = [Req(rid=rid, input_ids=[1, 2, 3], params=parse_sampling_params({"max_new_tokens": 2}),
                sink=RecordingSink()) for rid in ("bad", "other")]
    for req, future in zip(reqs, (bad, good)):
        sched.outputs.init_request(req)
        req.grammar_future, req.state = future, ReqState.GRAMMAR
        sched.grammar_queue.append(req)
    real_fail = sched.outputs.fail

    def fail(req, message):  # its send finds the client gone: all of the client's requests end
        real_fail(req, message)
        sched.abort(lambda r: r is reqs[1])

    sched.outputs.fail = fail
    sched._poll_grammars()
    assert reqs[0].sink.error == "bad regex"
    assert reqs[1].is_finished and reqs[1].sink.finished == 1
    assert not sched.grammar_queue and not sched.waiting and not sched.has_work
