"""The captured batch sizes (CPU-testable part of the CUDA-graph runner)."""

import bisect

import pytest

from sglite.runtime.executor.cuda_graph import MAX_CAPTURE_BS, capture_batch_sizes


@pytest.mark.parametrize("max_bs", [1, 3, 8, 100, 128, 256, 300, MAX_CAPTURE_BS])
def test_sizes_cover_every_batch_with_bounded_padding(max_bs):
    sizes = capture_batch_sizes(max_bs)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_bs
    for bs in range(1, max_bs + 1):
        padded = sizes[bisect.bisect_left(sizes, bs)]
        assert bs <= padded and (bs <= 8 or padded - bs < 32)


@pytest.mark.parametrize("max_bs", [0, MAX_CAPTURE_BS + 1])
def test_bad_max_bs_is_named(max_bs):
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        capture_batch_sizes(max_bs)
