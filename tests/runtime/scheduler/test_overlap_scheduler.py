"""The overlapped decode loop (Scheduler enable_overlap): the same tokens and finish reasons as the
plain loop (greedy and seeded sampled requests, stop tokens), KV accounting intact after every step
(also with an abort while a decode is pending), and no token past max_new_tokens."""

import pytest
import torch

from sglite.protocol import parse_sampling_params
from sglite.runtime.scheduler.req import Req
from tests.runtime.scheduler.sinks import RecordingSink


@pytest.fixture(scope="module")
def runner():
    from sglite.runtime.executor.model_runner import ModelRunner

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # fp32: rows of a batch must not depend on the batch's composition (it differs between loops)
    yield ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=2048,
                      max_running_requests=4)
    torch.set_num_threads(num_threads)


def _run(runner, specs, *, overlap: bool, abort_at: tuple[int, str] | None = None,
         logprob_rids=(), input_logprob_rids=(), seen=None):
    """seen: a dict that gets "extend" if an extend was ever left pending (read a step later)."""
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()  # the previous run's tree (and its slots) goes with its Scheduler
    sched = Scheduler(runner, max_running_requests=4, chunked_prefill_size=24, log_interval=0,
                      enable_overlap=overlap)
    reqs = {}
    for rid, prompt, params in specs:
        lp = dict(return_logprob=True, top_logprobs_num=3) if rid in logprob_rids else {}
        if rid in input_logprob_rids:  # as a select's choice: from the second prompt token on
            lp = dict(return_logprob=True, logprob_start_len=1, top_logprobs_num=2)
        req = Req(rid=rid, input_ids=prompt, params=parse_sampling_params(params), sink=RecordingSink(), **lp)
        sched.outputs.init_request(req)
        sched.add_request(req)
        reqs[rid] = req
    num_steps, pending_seen = 0, False
    while sched.has_work:
        sched.step()
        num_steps += 1
        pending_seen |= sched._pending is not None
        if seen is not None and sched._pending_extend is not None:
            seen["extend"] = True
        sched.cache.check_integrity()
        sched.cache.token_pool.check_integrity()
        if abort_at and num_steps == abort_at[0]:
            sched.abort(lambda r: r.rid == abort_at[1])
        assert num_steps < 500
    for req in reqs.values():
        assert req.sink.finished == 1 and req.sink.error is None, req.rid
        assert len(req.output_ids) <= req.params.max_new_tokens
    return reqs, pending_seen


def _specs(runner):
    gen = torch.Generator().manual_seed(1)
    vocab = runner.model_config.vocab_size

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    plain = {"temperature": 0, "ignore_eos": True}
    specs = [(f"p{i}", prompt(5 + 3 * i), {**plain, "max_new_tokens": n})
             for i, n in enumerate([1, 2, 5, 9, 13, 3, 7])]
    specs.append(("eos", prompt(6), {"temperature": 0, "max_new_tokens": 11}))
    specs.append(("seeded", prompt(7), {"temperature": 0.8, "seed": 3, "max_new_tokens": 6,
                                        "ignore_eos": True}))
    # sampled on the device while overlapped: seeded streams keyed by the token index
    specs.append(("nucleus", prompt(8), {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.01,
                                         "seed": 11, "max_new_tokens": 12}))
    return specs


def test_overlap_matches_plain_loop(runner):
    specs = _specs(runner)
    plain, _ = _run(runner, specs, overlap=False)
    # a stop token the plain loop produced mid-output: that request must stop there in both
    stop_id = plain["p4"].output_ids[4]
    specs.append(("stop", specs[4][1], {"temperature": 0, "ignore_eos": True,
                                        "max_new_tokens": 13, "stop_token_ids": [stop_id]}))
    plain, _ = _run(runner, specs, overlap=False)
    over, pending_seen = _run(runner, specs, overlap=True)
    assert pending_seen
    assert plain["stop"].finish_reason == {"type": "stop", "matched": stop_id}
    for rid, req in plain.items():
        assert over[rid].output_ids == req.output_ids, rid
        assert over[rid].finish_reason == req.finish_reason, rid
        assert over[rid].sink.meta["completion_tokens"] == len(req.output_ids)


def test_logprob_requests_stay_in_the_overlapped_loop(runner):
    """Output logprobs are gathered on the device and read with the tokens one step later: the
    same values as the plain loop, one entry per kept token (none for a token dropped after a
    stop), and the other rows of the batch unchanged."""
    specs = _specs(runner)
    wanting = {"p2", "p4", "eos", "seeded"}
    plain, _ = _run(runner, specs, overlap=False, logprob_rids=wanting)
    over, pending_seen = _run(runner, specs, overlap=True, logprob_rids=wanting)
    assert pending_seen
    for rid, req in plain.items():
        assert over[rid].output_ids == req.output_ids, rid
        if rid not in wanting:
            assert over[rid].logprobs == {}
            continue
        a, b = req.logprobs["output_token_logprobs"], over[rid].logprobs["output_token_logprobs"]
        assert len(a) == len(b) == len(req.output_ids), rid
        for (la, ta, _), (lb, tb, _) in zip(a, b):
            assert ta == tb and abs(la - lb) < 1e-4, rid
        tops_a, tops_b = req.logprobs["output_top_logprobs"], over[rid].logprobs["output_top_logprobs"]
        assert [[i for _, i, _ in t] for t in tops_a] == [[i for _, i, _ in t] for t in tops_b]
        assert all(len(t) == 3 for t in tops_b)


def test_prefill_only_extends_are_read_a_step_later(runner):
    """Extends that sample nothing (prefill-only requests, as a select's, and prompt chunks) are
    read after the next forward is launched: the same input logprobs (values, ids, tops) and
    finish reasons as the plain loop, beside generating requests, one of them also scored."""
    gen = torch.Generator().manual_seed(2)
    vocab = runner.model_config.vocab_size

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    only = {"max_new_tokens": 0}
    specs = [(f"s{i}", prompt(n), only) for i, n in enumerate([6, 30, 9, 57, 12])]  # 30, 57: chunked
    specs += [("g0", prompt(40), {"temperature": 0, "ignore_eos": True, "max_new_tokens": 5}),
              ("g1", prompt(8), {"temperature": 0, "ignore_eos": True, "max_new_tokens": 3})]
    scored = {"s0", "s1", "s3", "s4", "g0"}
    plain, _ = _run(runner, specs, overlap=False, input_logprob_rids=scored)
    seen = {}
    over, _ = _run(runner, specs, overlap=True, input_logprob_rids=scored, seen=seen)
    assert seen.get("extend")
    for rid, req in plain.items():
        assert over[rid].output_ids == req.output_ids, rid
        assert over[rid].finish_reason == req.finish_reason, rid
        if rid not in scored:
            assert over[rid].logprobs == {}, rid
            continue
        a, b = req.logprobs["input_token_logprobs"], over[rid].logprobs["input_token_logprobs"]
        assert len(a) == len(b) == len(req.input_ids) - 1, rid
        for (la, ta, _), (lb, tb, _) in zip(a, b):
            assert ta == tb and abs(la - lb) < 1e-4, rid
        tops_a, tops_b = req.logprobs["input_top_logprobs"], over[rid].logprobs["input_top_logprobs"]
        assert [[i for _, i, _ in t] for t in tops_a] == [[i for _, i, _ in t] for t in tops_b], rid
    assert over["s3"].finish_reason == {"type": "length", "matched": None}


def test_prefill_only_request_without_logprobs_finishes_at_its_launch(runner):
    """A select's prefix reads nothing of its forward: it finishes in the step that launches it
    (its KV is in the tree), so what waits on it is scheduled while the GPU computes it; a scored
    peer in the same extend still waits for its read."""
    from sglite.runtime.scheduler.scheduler import Scheduler

    runner.token_pool.reset()
    sched = Scheduler(runner, max_running_requests=4, chunked_prefill_size=64, log_interval=0,
                      enable_overlap=True)
    gen = torch.Generator().manual_seed(5)
    reqs = []
    for rid, lp in (("prefix", {}), ("scored", dict(return_logprob=True, logprob_start_len=1))):
        prompt = torch.randint(0, runner.model_config.vocab_size, (12,), generator=gen).tolist()
        req = Req(rid=rid, input_ids=prompt, params=parse_sampling_params({"max_new_tokens": 0}),
                  sink=RecordingSink(), **lp)
        sched.outputs.init_request(req)
        sched.add_request(req)
        reqs.append(req)
    sched.step()
    assert sched._pending_extend is not None  # the extend is not read yet
    assert reqs[0].sink.finished == 1 and reqs[0].finish_reason["type"] == "length"
    assert reqs[1].sink.finished == 0
    assert sched.cache.tree.match_length(reqs[0].input_ids) == len(reqs[0].input_ids)
    while sched.has_work:
        sched.step()
        sched.cache.check_integrity()
    assert reqs[1].sink.finished == 1 and len(reqs[1].logprobs["input_token_logprobs"]) == 11


def test_prefill_only_request_whose_last_token_goes_through_a_decode(runner):
    """25 prompt tokens in chunks of 24: the last one is computed by a decode, which the
    overlapped loop reads a step later; a prefill-only request still gets no output token."""
    prompt = torch.randint(0, runner.model_config.vocab_size, (25,),
                           generator=torch.Generator().manual_seed(4)).tolist()
    for overlap in (False, True):
        reqs, _ = _run(runner, [("s", prompt, {"max_new_tokens": 0})], overlap=overlap,
                       input_logprob_rids={"s"})
        assert reqs["s"].output_ids == [] and reqs["s"].finish_reason["type"] == "length", overlap
        assert len(reqs["s"].logprobs["input_token_logprobs"]) == 24, overlap


def test_abort_while_an_extend_is_pending(runner):
    """A prefill-only request aborted while its extend is pending finishes once, as aborted, and
    its KV goes back (the integrity checks after every step)."""
    gen = torch.Generator().manual_seed(3)
    vocab = runner.model_config.vocab_size
    specs = [(f"s{i}", torch.randint(0, vocab, (n,), generator=gen).tolist(), {"max_new_tokens": 0})
             for i, n in enumerate([50, 7, 9])]
    over, _ = _run(runner, specs, overlap=True, abort_at=(1, "s0"), input_logprob_rids={"s0", "s1"})
    assert over["s0"].finish_reason["type"] == "abort"
    assert over["s1"].finish_reason["type"] == "length"
    assert len(over["s1"].logprobs["input_token_logprobs"]) == 6


def test_overlap_abort_while_pending(runner):
    specs = _specs(runner)
    plain, _ = _run(runner, specs, overlap=False)
    over, _ = _run(runner, specs, overlap=True, abort_at=(4, "p4"))
    assert over["p4"].finish_reason["type"] == "abort"
    for rid, req in plain.items():
        if rid != "p4":
            assert over[rid].output_ids == req.output_ids, rid


@pytest.fixture(scope="module")
def varied_runner():
    """Untied embeddings: tiny random weights with tied ones repeat one token under greedy
    decoding, so a stop token could only end a request at its first token."""
    from sglite.runtime.executor.model_runner import ModelRunner

    return ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=2048,
                       max_running_requests=4, config_overrides=dict(tie_word_embeddings=False))


def test_stop_token_ends_a_request_launched_ahead(varied_runner):
    """Greedy requests that a stop token can end run overlapped too: the decode launched ahead
    of reading the stop token is wasted for that request, nothing else changes (same tokens and
    finish reasons as the plain loop, KV accounting checked every step in _run)."""
    runner = varied_runner
    gen = torch.Generator().manual_seed(7)
    vocab = runner.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (6, 9, 12)]
    greedy = {"temperature": 0, "max_new_tokens": 13}
    specs = [(f"g{i}", p, {**greedy, "ignore_eos": True}) for i, p in enumerate(prompts)]
    plain, _ = _run(runner, specs, overlap=False)
    out = plain["g1"].output_ids
    first = next(i for i in range(3, 12) if out[i] not in out[:i])  # a token new mid-output
    specs.append(("stop", prompts[1], {**greedy, "stop_token_ids": [out[first]]}))  # EOS can end it too
    plain, _ = _run(runner, specs, overlap=False)
    over, pending_seen = _run(runner, specs, overlap=True)
    assert pending_seen
    assert plain["stop"].finish_reason == {"type": "stop", "matched": out[first]}
    assert plain["stop"].output_ids == out[: first + 1]
    for rid, req in plain.items():
        assert over[rid].output_ids == req.output_ids, rid
        assert over[rid].finish_reason == req.finish_reason, rid


def test_penalties_and_min_new_tokens_launched_ahead(varied_runner):
    """Penalties and min_new_tokens run overlapped too: the sampler on the device counts the
    token still in flight (penalties, EOS/stop mask), so the tokens equal the plain loop's."""
    runner = varied_runner
    gen = torch.Generator().manual_seed(11)
    vocab = runner.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 10, 5, 8)]
    plain_greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    early = _run(runner, [("probe", prompts[3], plain_greedy)], overlap=False)[0]["probe"].output_ids[1]
    specs = [
        ("rep", prompts[0], {**plain_greedy, "repetition_penalty": 1.5}),
        ("freq", prompts[1], {**plain_greedy, "frequency_penalty": 0.8, "presence_penalty": 0.5}),
        ("seeded", prompts[2], {**plain_greedy, "temperature": 0.9, "seed": 5, "frequency_penalty": 0.4}),
        # the early token may not end it before 6 tokens: masked while in flight too
        ("min_new", prompts[3], {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 6,
                                 "stop_token_ids": [early]}),
    ]
    plain, _ = _run(runner, specs, overlap=False)
    over, pending_seen = _run(runner, specs, overlap=True)
    assert pending_seen
    assert len(plain["min_new"].output_ids) >= 6
    assert plain["rep"].output_ids != _run(runner, [("x", prompts[0], plain_greedy)], overlap=False)[0]["x"].output_ids
    for rid, req in plain.items():
        assert over[rid].output_ids == req.output_ids, rid
        assert over[rid].finish_reason == req.finish_reason, rid
