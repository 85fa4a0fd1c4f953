"""The decode-batch unpack kernel (the first op of every decode CUDA graph) against plain indexing:
host tokens, tokens fed from the device, pad rows that must leave req_to_token alone."""

import pytest
import torch

from sglite.kernels.decode_batch import PAD_ROW, stage_decode_batch, unpack_decode_batch
from sglite.kernels.reference import unpack_decode_batch_ref
from tests.kernels.pool import DEVICE


@pytest.mark.parametrize("num_rows", [1, 7, 40])
def test_unpack_matches_reference(num_rows):
    gen = torch.Generator().manual_seed(num_rows)
    real = max(1, num_rows - 3)  # the last rows are pads when there are enough
    rows = torch.randperm(64, generator=gen)[:real]
    positions = torch.randint(0, 200, (real,), generator=gen)
    fed_ids = torch.randint(0, 32000, (real,), generator=gen)
    sources = torch.where(torch.rand(real, generator=gen) < 0.5, torch.randperm(real, generator=gen), -1)
    staged = torch.tensor([PAD_ROW] * num_rows, dtype=torch.int64).T.contiguous()
    staged[:, :real] = torch.stack([
        torch.randint(0, 32000, (real,), generator=gen), sources, positions, rows, positions + 1,
        torch.randint(1, 10_000, (real,), generator=gen)])
    table = torch.randint(0, 10_000, (64, 256), generator=gen, dtype=torch.int32)
    expected_table = table.clone()
    expected = unpack_decode_batch_ref(staged, fed_ids, expected_table)

    staged, fed_ids, table = staged.to(DEVICE), fed_ids.to(DEVICE), table.to(DEVICE)
    out = {name: torch.full_like(t, -7, device=DEVICE) for name, t in expected.items()}
    unpack_decode_batch(staged, fed_ids, **out, req_to_token=table)
    for name, t in expected.items():
        assert torch.equal(out[name].cpu(), t), name
    assert torch.equal(table.cpu(), expected_table)  # pad rows wrote nothing (row 0, position 0)
    if num_rows > real:
        assert (out["out_cache_loc"][real:] == 0).all() and (out["seq_lens"][real:] == 1).all()


@pytest.mark.parametrize("fed", [dict(), dict(num_fed=2), dict(num_fed=5, fed_index=[2, 0])],
                         ids=["host", "fed", "fed-indexed"])
def test_stage_decode_batch(fed):
    """The host block both decode paths copy: one column per request, sources for the fed
    requests (the first ones), pad rows after."""
    block = stage_decode_batch([11, 12, 13], [4, 9, 2], [5, 0, 7], torch.tensor([40, 41, 42]), num_rows=5, **fed)
    sources = {"num_fed": [0, 1, -1], "fed_index": [2, 0, -1]}
    expected_sources = sources["fed_index" if "fed_index" in fed else "num_fed"] if fed else [-1, -1, -1]
    assert block.dtype == torch.int64 and block.shape == (6, 5) and block.is_contiguous()
    assert block[:, :3].tolist() == [[11, 12, 13], expected_sources, [3, 8, 1], [5, 0, 7], [4, 9, 2], [40, 41, 42]]
    assert block[:, 3:].T.tolist() == [list(PAD_ROW)] * 2


def test_unpack_rejects_bad_block():
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"contiguous \[6, P\]"):
        unpack_decode_batch(torch.zeros(5, 4, dtype=torch.int64), ids, ids, ids, ids,
                            ids.int(), ids.int(), ids, torch.zeros(2, 8, dtype=torch.int32))
