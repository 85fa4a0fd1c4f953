"""Batches are staged in one host-to-device copy; every per-token and per-request field must still
start on 16 bytes, whatever the token count: Triton specializes kernels on pointer alignment, and
a field at an odd offset made each odd-sized batch a new kernel variant (a compile mid-run)."""

import pytest
import torch

from sglite.runtime.executor.model_runner import ModelRunner


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=256,
                       max_running_requests=4)


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1


@pytest.mark.parametrize("lens", [[3], [1, 2], [2, 2, 3]])
def test_extend_batch_fields_are_aligned(runner, lens):
    rows = [runner.req_to_token.alloc() for _ in lens]
    try:
        slots = runner.token_pool.alloc(sum(lens))
        batch = runner.make_extend_batch(rows, [0] * len(lens), [[5] * n for n in lens], slots)
        for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens",
                     "prefix_lens", "extend_lens"):
            assert aligned(getattr(batch, name)), name
        assert batch.positions.tolist() == [p for n in lens for p in range(n)]
        assert batch.out_cache_loc.tolist() == slots.tolist()
        assert batch.req_pool_indices.tolist() == rows
        assert batch.extend_lens.tolist() == lens and batch.prefix_lens.tolist() == [0] * len(lens)
        assert batch.seq_lens.tolist() == lens and batch.input_ids.tolist() == [5] * sum(lens)
        runner.token_pool.free(slots)
    finally:
        for r in rows:
            runner.req_to_token.free(r)


@pytest.mark.parametrize("bs", [1, 3])
def test_decode_batch_fields_are_aligned(runner, bs):
    rows = [runner.req_to_token.alloc() for _ in range(bs)]
    try:
        slots = runner.token_pool.alloc(bs)
        batch = runner.make_decode_batch(rows, [4 + i for i in range(bs)], [7] * bs, slots)
        for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens", "prefix_lens"):
            assert aligned(getattr(batch, name)), name
        assert batch.positions.tolist() == batch.prefix_lens.tolist() == [3 + i for i in range(bs)]
        assert batch.seq_lens.tolist() == [4 + i for i in range(bs)] and batch.input_ids.tolist() == [7] * bs
        assert batch.out_cache_loc.tolist() == slots.tolist()
        runner.token_pool.free(slots)
    finally:
        for r in rows:
            runner.req_to_token.free(r)


def test_eager_decode_feeds_device_tokens(runner):
    """The eager decode stages its batch as the CUDA graphs do: input ids fed from a device tensor
    through an index for the first requests, host ids for the rest, slots into req_to_token."""
    rows = [runner.req_to_token.alloc() for _ in range(3)]
    try:
        slots = runner.token_pool.alloc(3)
        fed_ids = torch.tensor([70, 71, 72, 73])
        batch = runner.make_decode_batch(rows, [5, 6, 7], [0, 0, 9], slots, fed_ids=fed_ids, fed_index=[3, 1])
        assert batch.input_ids.tolist() == [73, 71, 9]
        assert runner.req_to_token.table[rows, [4, 5, 6]].tolist() == slots.tolist()
        batch = runner.make_decode_batch(rows[:2], [5, 6], [0, 8], slots[:2], fed_ids=fed_ids[:1])
        assert batch.input_ids.tolist() == [70, 8]
        runner.token_pool.free(slots)
    finally:
        for r in rows:
            runner.req_to_token.free(r)


def test_padded_logit_rows_give_the_same_logits(runner, monkeypatch):
    """On CUDA the LM head's rows are padded to a multiple of LOGIT_ROW_BUCKET (base.py): the
    forward still returns exactly the wanted rows' logits, as an unpadded forward does (padding
    forced here on the CPU)."""
    from sglite.runtime.executor import model_runner
    from sglite.runtime.executor.attention import base
    from sglite.runtime.models import llama

    lens, logits_from = [5, 3, 4], [2, 0, 3]
    rows = [runner.req_to_token.alloc() for _ in lens]
    try:
        slots = runner.token_pool.alloc(sum(lens))
        ids = [[(7 * i + j) % 50 for j in range(n)] for i, n in enumerate(lens)]
        plain = runner.forward(runner.make_extend_batch(rows, [0] * 3, ids, slots, logits_from=logits_from))
        last = runner.forward(runner.make_extend_batch(rows, [0] * 3, ids, slots))
        pad = lambda r, device: r + r[-1:] * (-len(r) % base.LOGIT_ROW_BUCKET)  # noqa: E731
        monkeypatch.setattr(model_runner, "pad_logit_rows", pad)
        monkeypatch.setattr(llama, "pad_logit_rows", pad)
        batch = runner.make_extend_batch(rows, [0] * 3, ids, slots, logits_from=logits_from)
        assert batch.logit_rows.shape[0] == base.LOGIT_ROW_BUCKET and batch.num_logit_rows == 3 + 3 + 1
        torch.testing.assert_close(runner.forward(batch), plain)
        torch.testing.assert_close(runner.forward(runner.make_extend_batch(rows, [0] * 3, ids, slots)), last)
        assert plain.shape[0] == 7 and last.shape[0] == 3
        runner.token_pool.free(slots)
    finally:
        for r in rows:
            runner.req_to_token.free(r)
