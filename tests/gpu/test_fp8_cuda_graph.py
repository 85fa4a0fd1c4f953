"""FP8 Llama decode (issue 19): CUDA-graph replay vs eager on the same runner, FP8 weights alone
and with the FP8 KV pool. The graph is captured for padded batch sizes and the context limit
(its attention splits differ from the eager launch's), so logits agree to rounding and the greedy
tokens agree wherever eager's top two are not a near tie."""

import pytest
import torch

from tests.gpu.helpers import decode, make_runner, prefill

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"], ids=["fp8-weights", "fp8-weights+kv"])
def test_fp8_graph_tokens_match_eager(kv):
    runner = make_runner(quantization="fp8", kv_cache_dtype=kv, cuda_graph_max_bs=16)
    assert runner.graph_runner is not None
    assert runner.quantization == "fp8"
    g = torch.Generator().manual_seed(3)
    lens = [4, 33, 129, 300, 1000]  # bs 5 replays the bs-8 graph with 3 pad rows
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in lens]
    rows, logits = prefill(runner, prompts)
    seq_lens, last = list(lens), logits.argmax(-1).tolist()
    worst, compared, ties = 0.0, 0, 0
    for step in range(8):
        if step == 4:  # bs 2 replays the bs-2 graph, stale pad rows in the buffers
            rows, seq_lens, last = rows[1:4:2], seq_lens[1:4:2], last[1:4:2]
        seq_lens = [s + 1 for s in seq_lens]
        # the same step twice: the eager pass stores K/V, the graph pass stores the same again
        eager = decode(runner, rows, seq_lens, last, use_cuda_graph=False).float()
        slots = runner.req_to_token.table[rows, [s - 1 for s in seq_lens]].long().cpu()
        graph = runner.forward(runner.make_decode_batch(rows, seq_lens, last, slots)).float()
        assert torch.isfinite(graph).all()
        err = ((graph - eager).norm() / eager.norm()).item()
        worst = max(worst, err)
        assert err < 2e-2, f"step {step}: graph vs eager rel err {err:.2e}"
        top2 = eager.topk(2, dim=-1)
        gap = (top2.values[:, 0] - top2.values[:, 1]) / eager.std(dim=-1)
        clear = gap > 0.05  # a clear top-1: the graph must pick the same token
        g_tok, e_tok = graph.argmax(-1), top2.indices[:, 0]
        assert torch.equal(g_tok[clear], e_tok[clear]), f"step {step}: graph {g_tok.tolist()} eager {e_tok.tolist()}"
        compared += int(clear.sum())
        ties += int((~clear).sum())
        last = g_tok.tolist()
    assert compared >= 20
    print(f"\nfp8 graph vs eager (kv {kv}): worst rel err {worst:.2e}, {compared} tokens equal, {ties} near ties")
