"""CUDA-graph decode vs eager decode on the same runner: same logits (up to bf16 rounding) over
several steps with ragged lengths, padded batch sizes, and windowed layers (W + G)."""

import pytest
import torch

from tests.gpu.helpers import decode, make_runner, prefill

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window", [None, (96, 4)], ids=["dense", "window96+4"])
def test_graph_logits_match_eager(window):
    overrides = {} if window is None else dict(sliding_window=window[0], global_tokens=window[1])
    runner = make_runner(config_overrides=overrides, cuda_graph_max_bs=16)
    assert runner.graph_runner is not None
    g = torch.Generator().manual_seed(1)
    lens = [3, 17, 130, 257, 1000]  # ragged; bs 5 replays the bs-8 graph with 3 pad rows
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in lens]
    rows, logits = prefill(runner, prompts)
    seq_lens, last = list(lens), logits.argmax(-1).tolist()
    worst = 0.0
    for step in range(6):
        if step == 3:  # drop requests: bs 2 replays the bs-2 graph, stale pad rows in the buffers
            rows, seq_lens, last = rows[1:4:2], seq_lens[1:4:2], last[1:4:2]
        seq_lens = [s + 1 for s in seq_lens]
        # the same step twice: the eager pass stores K/V, the graph pass stores the same again
        eager = decode(runner, rows, seq_lens, last, use_cuda_graph=False)
        slots = runner.req_to_token.table[rows, [s - 1 for s in seq_lens]].long().cpu()
        batch = runner.make_decode_batch(rows, seq_lens, last, slots)
        graph = runner.forward(batch).clone()
        assert torch.isfinite(graph).all()
        err = ((graph - eager).norm() / eager.norm()).item()
        worst = max(worst, err)
        assert err < 2e-2, f"step {step}: graph vs eager rel err {err:.2e}"
        last = graph.argmax(-1).tolist()
    print(f"\ngraph vs eager ({'dense' if window is None else window}): worst rel err {worst:.2e}")


def test_forward_decode_feeds_device_tokens():
    """The scheduler's path (forward_decode): the batch staged in one block and unpacked inside
    the graph, some input ids fed from a device tensor through an index, pad rows. Same logits and
    input ids as the eager path, the new slots in req_to_token, and the pad rows wrote nothing."""
    runner = make_runner(cuda_graph_max_bs=16)
    g = torch.Generator().manual_seed(2)
    lens = [5, 40, 300, 9, 77]
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in lens]
    rows, _ = prefill(runner, prompts)
    table = runner.req_to_token.table
    table[0, 0] = 12345  # what a pad row (row 0, position 0) must leave alone
    fed_ids = torch.randint(0, 128000, (7,), generator=g).cuda()
    fed_index = [6, 0, 3]  # rows 0-2 read fed_ids[6], [0], [3]; rows 3-4 their host ids
    host_ids = [0, 0, 0, 111, 222]
    seq_lens = [n + 1 for n in lens]
    slots = runner.token_pool.alloc(len(rows))
    out = {}
    for use_graph in (False, True):  # the same step twice: both store the same K/V
        logits, ids = runner.forward_decode(rows, seq_lens, host_ids, slots, fed_ids=fed_ids,
                                            fed_index=fed_index, use_cuda_graph=use_graph)
        out[use_graph] = logits.clone(), ids.clone()
    expected_ids = torch.tensor([*fed_ids[fed_index].tolist(), 111, 222])
    assert torch.equal(out[False][1].cpu(), expected_ids) and torch.equal(out[True][1].cpu(), expected_ids)
    err = ((out[True][0] - out[False][0]).norm() / out[False][0].norm()).item()
    assert err < 2e-2, f"graph vs eager rel err {err:.2e}"
    assert torch.equal(table[rows, [n - 1 for n in seq_lens]].long().cpu(), slots)
    assert table[0, 0].item() == 12345
