"""Issue 20: one row's out-of-range stop_token_ids must neither fail the batch nor touch another row."""

import torch

from sglite.protocol import SamplingParams
from sglite.runtime.sampling.sampler import SamplingBatch

VOCAB = 50


def _batch(params):
    return SamplingBatch.from_requests(params, [[] for _ in params], [[] for _ in params])


def test_stop_id_past_the_vocabulary_does_not_fail_the_batch():
    logits = torch.zeros(3, VOCAB)
    logits[:, 3] = 5.0
    logits[1, 0] = 6.0  # where row 0's id VOCAB used to land
    bad = SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=[VOCAB, VOCAB + 7, 3])
    params = [bad, SamplingParams(temperature=0), bad]  # the last row's ids used to raise
    assert _batch(params).sample(logits).tolist() == [0, 0, 0]  # 0 and 2 ban 3; 1 untouched


def test_negative_stop_id_does_not_ban_the_neighbouring_row():
    logits = torch.zeros(2, VOCAB)
    logits[:, VOCAB - 1] = 5.0  # row 1 * VOCAB - 1 is row 0's last token
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, min_new_tokens=2,
                                                            stop_token_ids=[-1])]
    out = _batch(params).process_logits(logits)
    assert torch.isfinite(out).all()
    assert _batch(params).sample(logits).tolist() == [VOCAB - 1, VOCAB - 1]
