from __future__ import annotations

import pytest
import torch

from sglite.protocol import SamplingParams
from sglite.runtime.sampling.sampler import SamplingBatch, sample_batch

VOCAB = 50


def _logits(bs: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(bs, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(params, logits, output_ids=None, **kw):
    output_ids = output_ids or [[] for _ in params]
    return SamplingBatch.from_requests(params, output_ids, [[] for _ in params], **kw).sample(logits)


def test_greedy_and_top_k_1_are_argmax():
    logits = _logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=2.0),
              SamplingParams(temperature=0), SamplingParams(top_k=1)]
    assert _sample(params, logits).tolist() == logits.argmax(-1).tolist()
    mixed = params[:2] + [SamplingParams(temperature=1.0)] * 2  # not the all-greedy fast path
    assert _sample(mixed, logits)[:2].tolist() == logits.argmax(-1)[:2].tolist()


def test_logits_not_modified():
    logits = _logits(2)
    before = logits.clone()
    _sample([SamplingParams(frequency_penalty=1.0, min_new_tokens=3)] * 2, logits,
            [[1, 1, 2], [3]], eos_ids=[0])
    assert torch.equal(logits, before)


def test_seeded_rows_reproducible_and_batch_independent():
    logits = _logits(3)
    seeded = SamplingParams(temperature=1.5, seed=1234)
    runs = [_sample([seeded, SamplingParams(), SamplingParams()], logits)[0] for _ in range(3)]
    alone = _sample([seeded], logits[:1])[0]
    elsewhere = _sample([SamplingParams(temperature=0.5), seeded], logits[[2, 0]])[1]
    assert len(set(int(r) for r in runs)) == 1 and int(alone) == int(runs[0]) == int(elsewhere)
    # over steps / seeds the draws differ (a seed is not a constant choice)
    draws = {int(_sample([SamplingParams(temperature=5.0, seed=s)], logits[:1])[0]) for s in range(20)}
    assert len(draws) > 3


def _draw_many(params, logits_row, n=300):
    # n seeded rows of the same logits: a deterministic sample of the distribution
    ps = [SamplingParams(**params, seed=s) for s in range(n)]
    return _sample(ps, logits_row.expand(n, -1)).tolist()


def test_top_p_min_p_top_k_never_pick_excluded_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)) + 1e-9
    logits = probs.log()
    assert set(_draw_many(dict(top_p=0.7), logits)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(_draw_many(dict(top_p=0.45), logits)) == {0}
    assert set(_draw_many(dict(min_p=0.35), logits)) == {0, 1}  # 0.15 < 0.35 * 0.5
    assert set(_draw_many(dict(top_k=3), logits)) == {0, 1, 2}
    assert set(_draw_many(dict(top_k=3, top_p=0.7), logits)) == {0, 1}
    counts = torch.bincount(torch.tensor(_draw_many({}, logits, n=2000)), minlength=4)[:4]
    assert torch.allclose(counts / 2000, probs[:4], atol=0.04)  # unfiltered draws follow probs


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0] + [-30.0] * (VOCAB - 2))
    cold = _draw_many(dict(temperature=0.2), logits, n=400)
    hot = _draw_many(dict(temperature=2.0), logits, n=400)
    assert cold.count(0) > 390 and 200 < hot.count(0) < 330  # p0 = 0.993 vs 0.62


def test_penalties_change_logits_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5] + [0.0] * (VOCAB - 4)] * 2)
    params = [SamplingParams(repetition_penalty=2.0),
              SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    batch = SamplingBatch.from_requests(params, [[1], [2, 2, 3]], [[0], [0]])
    out = batch.process_logits(logits)
    assert out[0, :4].tolist() == [1.0, -4.0, 1.0, 0.5]  # prompt id 0 and output id 1 penalized
    assert out[1, :4].tolist() == [2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25]  # output only
    assert torch.equal(out[:, 4:], logits[:, 4:])
    with pytest.raises(ValueError, match="prompt_ids"):
        SamplingBatch.from_requests(params, [[], []], None)


def test_min_new_tokens_blocks_eos_and_stop_ids():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 10.0  # EOS is the favourite
    logits[:, 9] = 9.0  # a stop token id is next
    params = [SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=[9])] * 2
    out = _sample(params, logits, [[5], [5, 6]], eos_ids=[7])
    assert out.tolist() == [0, 7]  # row 0 still below min_new_tokens; row 1 reached it


def test_allowed_mask_respected():
    logits = _logits(3)
    mask = torch.zeros(3, VOCAB, dtype=torch.bool)
    mask[0, [3, 4]] = True
    mask[1, 11] = True
    mask[2] = True
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=0)]
    batch = SamplingBatch.from_requests(params, [[], [], []], [[], [], []])
    for _ in range(20):
        out = batch.sample(logits, allowed_mask=mask)
        assert int(out[0]) in (3, 4) and int(out[1]) == 11
        assert int(out[2]) == int(logits[2].argmax())
    with pytest.raises(ValueError, match="allows no token"):
        batch.sample(logits, allowed_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="allowed_mask must be bool"):
        batch.sample(logits, allowed_mask=mask[:, :10])


def test_sample_batch_one_call_form():
    logits = _logits(2)
    out = sample_batch(logits, [SamplingParams(temperature=0)] * 2, [[], []], eos_token_ids=[0])
    assert out.tolist() == logits.argmax(-1).tolist()


def test_pending_tokens_count_like_appended_ones():
    """The overlapped decode's rows whose last token is still on the device (pending_ids) get the
    same penalties, min_new_tokens mask and seeded draw as if it were in output_ids."""
    params = [SamplingParams(temperature=0.9, seed=7, repetition_penalty=1.4, frequency_penalty=0.7,
                             presence_penalty=0.3, min_new_tokens=3),
              SamplingParams(temperature=0, frequency_penalty=-1.0, min_new_tokens=4, stop_token_ids=[9]),
              SamplingParams(temperature=0, repetition_penalty=1.2)]
    outputs = [[4, 4], [9, 2], [1]]
    prompts = [[3, 8], [5], [6, 6]]
    pending = torch.tensor([12, 11])  # rows 0 and 1 generated these (new tokens); row 2: none
    logits = _logits(3, seed=5)
    ahead = SamplingBatch.from_requests(params, outputs, prompts, eos_ids=[0], pending_ids=pending,
                                        steps=[len(o) + (i < 2) for i, o in enumerate(outputs)])
    appended = [o + [int(t)] for o, t in zip(outputs, pending)] + outputs[2:]
    plain = SamplingBatch.from_requests(params, appended, prompts, eos_ids=[0])
    # row 0: the pending token is its 3rd, so min_new_tokens no longer masks EOS; row 1: 3 of 4
    assert ahead.banned_ids == plain.banned_ids == [[], [0, 9], []]
    unaware = SamplingBatch.from_requests(params, outputs, prompts, eos_ids=[0])
    assert unaware.banned_ids[0] == [0] and not torch.equal(unaware.process_logits(logits),
                                                            plain.process_logits(logits))
    assert torch.equal(ahead.process_logits(logits), plain.process_logits(logits))
    assert torch.equal(ahead.sample(logits), plain.sample(logits))
