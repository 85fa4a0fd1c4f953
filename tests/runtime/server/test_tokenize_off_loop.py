"""Long texts are tokenized on the handler's worker thread while the loop keeps stepping the batch
(handlers.Tokenizing), in process: a real Server and Scheduler on a tiny random model, driven by
Server.run's own loop body, with a slow stand-in tokenizer (the tiny model has none)."""

import threading
import time
import uuid

import pytest
import zmq

from sglite import protocol
from sglite.runtime.server.handlers import TOKENIZE_OFF_LOOP_CHARS

LONG = "x" * TOKENIZE_OFF_LOOP_CHARS
SLOW_S = 0.3


@pytest.fixture
def served(monkeypatch):
    from sglite.runtime.executor.model_runner import ModelRunner
    from sglite.runtime.scheduler.scheduler import Scheduler
    from sglite.runtime.server.args import ServerArgs
    from sglite.runtime.server.zmq_server import Server

    runner = ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=256,
                         max_running_requests=4)
    scheduler = Scheduler(runner, max_running_requests=4, chunked_prefill_size=64,
                          log_interval=0, enable_overlap=False)
    server = Server(ServerArgs(address=f"ipc:///tmp/sglite-t-{uuid.uuid4().hex[:8]}", device="cpu"),
                    scheduler)
    handler = server.handler
    handler.tokenizer = object()  # a tokenizer is there: long texts go to the worker
    handler.__dict__["max_token_chars"] = 1024  # (a cached property of the real tokenizer)
    calls = []

    def slow_tokenize(text):
        calls.append(threading.current_thread().name)
        time.sleep(SLOW_S)
        return [5 + len(text) % 7] * (3000 if text.startswith("too long") else 8)

    monkeypatch.setattr(handler, "tokenize", slow_tokenize)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.address)
    yield server, dealer, calls
    dealer.close()
    server.close()


def _pump(server, dealer, want: int, timeout: float = 30.0, progress=None) -> list:
    """Server.run's loop (run_once) until `want` replies finished; returns (time, reply) pairs.
    progress: a list that gets (time, output tokens of each running request by rid) a step."""
    out, done, deadline = [], 0, time.monotonic() + timeout
    while done < want:
        if progress is not None:
            progress.append((time.monotonic(), {r.rid: len(r.output_ids) for r in server.scheduler.running}))
        assert time.monotonic() < deadline, f"only {done} of {want} replies"
        server.run_once()
        while dealer.poll(0):
            reply = protocol.decode_reply(dealer.recv())
            out.append((time.monotonic(), reply))
            done += isinstance(reply, protocol.ErrorOut) or reply.finished
    return out


def test_a_long_text_is_tokenized_beside_the_running_batch(served):
    server, dealer, calls = served
    dealer.send(protocol.encode(protocol.GenerateReq(
        rid="short", input_ids=[5, 6, 7], stream=True,
        sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True})))
    dealer.send(protocol.encode(protocol.GenerateReq(
        rid="long", text=LONG, sampling_params={"max_new_tokens": 2, "temperature": 0})))
    t0, progress = time.monotonic(), []
    replies = _pump(server, dealer, want=2, progress=progress)
    long_done = [t for t, r in replies if r.rid == "long" and r.finished]
    assert calls and calls[0].startswith("sglite-tokenize")  # not the loop's thread
    assert long_done and long_done[0] - t0 >= SLOW_S
    # the short request kept decoding while the long text was on the worker
    during = [n.get("short", 0) for t, n in progress if t - t0 < 0.9 * SLOW_S]
    assert max(during) >= 5, during[-5:]
    finished = {r.rid: r for _, r in replies if not isinstance(r, protocol.ErrorOut) and r.finished}
    assert finished["long"].meta_info["prompt_tokens"] == 8
    assert finished["short"].meta_info["completion_tokens"] == 40


def test_an_abort_while_tokenizing_answers_as_an_abort(served):
    server, dealer, _ = served
    dealer.send(protocol.encode(protocol.GenerateReq(
        rid="a", text=LONG, sampling_params={"max_new_tokens": 50, "temperature": 0})))
    dealer.send(protocol.encode(protocol.AbortReq(rid="a")))
    (_, reply), = _pump(server, dealer, want=1)
    assert reply.rid == "a" and reply.finished
    assert reply.meta_info["finish_reason"]["type"] == "abort"
    assert not server.scheduler.has_work and not server.handler.tokenizing


def test_a_text_too_long_in_tokens_is_refused_after_tokenizing(served):
    server, dealer, _ = served
    dealer.send(protocol.encode(protocol.GenerateReq(rid="big", text="too long" + LONG,
                                                     sampling_params={"max_new_tokens": 2})))
    dealer.send(protocol.encode(protocol.GenerateReq(rid="big", text=LONG, sampling_params={})))
    replies = [r for _, r in _pump(server, dealer, want=2)]
    errors = {r.message for r in replies if isinstance(r, protocol.ErrorOut)}
    assert any("3000 tokens" in m for m in errors)
    assert any("already in use" in m for m in errors)  # the rid is taken while it tokenizes


def test_a_client_gone_while_tokenizing_is_dropped(served):
    server, dealer, _ = served
    dealer.send(protocol.encode(protocol.GenerateReq(rid="g", text=LONG, sampling_params={})))
    deadline = time.monotonic() + 10
    while not server.handler.tokenizing:
        assert time.monotonic() < deadline
        server._receive(block=False)
    server.handler.client_gone(server.handler.tokenizing[0].identity)
    deadline = time.monotonic() + 10
    while server.handler.tokenizing:
        assert time.monotonic() < deadline
        server.handler.admit_tokenized(timeout=0.01)
    assert not server.scheduler.has_work
