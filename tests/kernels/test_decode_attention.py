"""Decode attention (split KV + LSE merge) against the torch reference."""

import pytest
import torch
import triton
import triton.language as tl

from sglite.kernels import decode_attention, pdl
from sglite.kernels.pdl import allow_dependents, wait_for_previous
from sglite.kernels.decode_attention import decode_attention_fwd
from sglite.kernels.decode_policy import MAX_SPLITS, decode_num_splits, decode_tiles
from sglite.kernels.reference import decode_attention_ref
from tests.kernels.pool import FP32_TOL, make_scenario, rel_err


def decode_scenario(seq_lens, **kw):
    return make_scenario([n - 1 for n in seq_lens], [1] * len(seq_lens), **kw)


def run_decode(sc, *, num_splits, sliding_window=None, global_tokens=0, tiles=None, page_size=1, early_tile=False):
    out = torch.full_like(sc.q, float("nan"))
    decode_attention_fwd(
        sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, sc.tensor(sc.rows, torch.int64),
        sc.tensor(sc.seq_lens), scale=sc.scale, num_splits=num_splits,
        sliding_window=sliding_window, global_tokens=global_tokens, tiles=tiles, page_size=page_size,
        early_tile=early_tile,
    )
    return out


# (query heads, KV heads, head_dim, window, globals, splits)
CASES = [
    (2, 2, 32, None, 0, 1),  # MHA, one split
    (8, 2, 32, None, 0, 4),  # GQA group 4, splits of which the last is empty for seq 40
    (16, 2, 16, 7, 2, 3),  # GQA group 8, window + global tokens, split over the visible keys
    (6, 1, 64, 5, 0, 8),  # MQA, group 6, more splits than visible keys
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,num_global,num_splits", CASES)
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, window, num_global, num_splits):
    sc = decode_scenario([1, 9, 40], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         sliding_window=window, global_tokens=num_global)
    out = run_decode(sc, num_splits=num_splits, sliding_window=window, global_tokens=num_global)
    ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                               scale=sc.scale, sliding_window=window, global_tokens=num_global)
    assert not out.isnan().any()
    assert rel_err(out, ref) < FP32_TOL


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,num_global,num_splits", CASES)
@pytest.mark.parametrize("page_size", [None, 16])
def test_early_first_tile_matches_reference(num_heads, num_kv_heads, head_dim, window, num_global, num_splits,
                                            page_size):
    """early_tile: each split's first tile gathered before the (PDL) wait and folded in apart from
    the loop over the rest (gathered, or bulk loads over pages), the new token's row read again."""
    splits = max(num_splits, 2)  # split launches only
    sc = decode_scenario([1, 9, 40, 70], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         sliding_window=window, global_tokens=num_global, page_size=page_size, seed=splits)
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused", tma=page_size is not None)
    out = run_decode(sc, num_splits=splits, sliding_window=window, global_tokens=num_global, tiles=tiles,
                     page_size=page_size or 1, early_tile=True)
    ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                               scale=sc.scale, sliding_window=window, global_tokens=num_global)
    assert not out.isnan().any()
    assert rel_err(out, ref) < FP32_TOL


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,num_global,num_splits", CASES)
def test_decode_over_pages_matches_reference(num_heads, num_kv_heads, head_dim, window, num_global, num_splits):
    """Tiles whose keys sit in consecutive slots take the bulk (TMA) loads, the others gather:
    pages of 16 and 32 slots (tiles of 16 keys under the interpreter), and a pool announced as
    paged whose runs are only 8 long (the runtime's fallback when no whole page is free)."""
    # the interpreter's tiles; bulk loads also where the launcher's policy would gather
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused", tma=True)
    for layout, announced in ((16, 16), (32, 32), (8, 16)):
        sc = decode_scenario([1, 9, 40, 70], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             sliding_window=window, global_tokens=num_global, page_size=layout, seed=layout)
        out = run_decode(sc, num_splits=num_splits, sliding_window=window, global_tokens=num_global,
                         page_size=announced, tiles=tiles)
        ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                                   scale=sc.scale, sliding_window=window, global_tokens=num_global)
        assert not out.isnan().any()
        assert rel_err(out, ref) < FP32_TOL


@pytest.mark.parametrize("ahead", [2, 4])
def test_bulk_loads_with_first_slots_ahead(ahead):
    """tiles["ahead"]: the TMA loop's tile coordinates taken `ahead` tiles at a time from
    registers (more tiles than that in a split: several chunks), against the reference."""
    sc = decode_scenario([1, 9, 40, 70, 130], num_heads=4, num_kv_heads=2, head_dim=16, page_size=16, seed=5)
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused", tma=True, ahead=ahead)
    for splits in (1, 2):
        out = run_decode(sc, num_splits=splits, page_size=16, tiles=tiles)
        ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                                   scale=sc.scale)
        assert not out.isnan().any()
        assert rel_err(out, ref) < FP32_TOL


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN tiles, under the interpreter
def test_consecutive_tiles_take_the_bulk_loads(monkeypatch):
    """Mutation check that the TMA path runs: descriptors over NaN copies of the pools poison the
    outputs of requests whose tiles lie in consecutive slots, and only those."""
    sc = decode_scenario([40, 70], num_heads=4, num_kv_heads=2, head_dim=16, page_size=16, seed=1)
    real = decode_attention._descriptors
    assert real(sc.k_buffer, sc.v_buffer, 16) is not None, "no TMA on this test device"
    poisoned = (torch.full_like(sc.k_buffer, float("nan")), torch.full_like(sc.v_buffer, float("nan")))
    monkeypatch.setattr(decode_attention, "_descriptors", lambda k, v, n: real(*poisoned, n))
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="fused")  # the interpreter's, also on a GPU
    assert run_decode(sc, num_splits=2, page_size=16, tiles=tiles).isnan().all()
    assert not run_decode(sc, num_splits=2, tiles=tiles).isnan().any()  # not announced as paged: gathers
    # full tiles on random slots
    scattered = decode_scenario([32, 48], num_heads=4, num_kv_heads=2, head_dim=16, seed=1)
    out = run_decode(scattered, num_splits=2, page_size=16, tiles=tiles)
    ref = decode_attention_ref(scattered.q, scattered.k_buffer, scattered.v_buffer, scattered.req_to_token,
                               scattered.rows, scattered.seq_lens, scale=scattered.scale)
    assert rel_err(out, ref) < FP32_TOL  # gathered: the poisoned descriptors never read


def test_split_count_independent():
    sc = decode_scenario([33, 50], num_heads=4, num_kv_heads=1, head_dim=16, seed=3)
    one = run_decode(sc, num_splits=1)
    assert torch.allclose(run_decode(sc, num_splits=5), one, atol=FP32_TOL)


def test_num_splits_policy():
    # ~2 programs per SM: batch 1 x 8 KV heads on 132 SMs takes 33 splits; a full batch needs none
    assert decode_num_splits(1, 8, num_sms=132) == 33
    assert decode_num_splits(64, 8, num_sms=132) == 1  # 512 programs already fill 132 SMs
    assert decode_num_splits(16, 8, num_sms=132) == 2
    assert decode_num_splits(1, 8, num_sms=132, max_kv_len=1000) == 8  # >= 128 keys per split
    assert decode_num_splits(1, 8, num_sms=132, max_kv_len=32768) == 32  # 33 would leave one empty
    assert decode_num_splits(1, 8, num_sms=132, max_kv_len=4100) == 33  # W=4096 + G=4: 128 keys each
    assert decode_num_splits(1, 8, num_sms=132, max_kv_len=1) == 1


def test_decode_rejects_bad_splits():
    sc = decode_scenario([4], num_heads=2, num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="num_splits"):
        run_decode(sc, num_splits=0)


def test_fused_merge_matches_merge_kernel_and_leaves_counters_zero():
    from sglite.kernels.decode_attention import _COUNTERS

    sc = decode_scenario([1, 9, 40], num_heads=8, num_kv_heads=2, head_dim=32, seed=5)
    tiles = dict(BLOCK_N=16, num_warps=1, num_stages=1)
    two = run_decode(sc, num_splits=4, tiles={**tiles, "merge": "kernel"})
    for _ in range(2):  # a counter left non-zero would make the second launch skip or double a merge
        fused = run_decode(sc, num_splits=4, tiles={**tiles, "merge": "fused"})
        assert not fused.isnan().any()
        assert torch.allclose(fused, two, atol=FP32_TOL)
    assert not _COUNTERS[sc.q.device].any()
    # one split: "fused" writes the output directly, "kernel" still merges in a second launch
    direct = run_decode(sc, num_splits=1, tiles={**tiles, "merge": "fused"})
    assert torch.allclose(direct, run_decode(sc, num_splits=1, tiles={**tiles, "merge": "kernel"}), atol=FP32_TOL)


def test_decode_rejects_bad_merge():
    sc = decode_scenario([4], num_heads=2, num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="merge"):
        run_decode(sc, num_splits=2, tiles=dict(BLOCK_N=16, num_warps=1, num_stages=1, merge="atomic"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_merge_in_cuda_graph_replays():
    """Captured as the runtime captures decode: the counters must be zero again at every replay,
    and the result must follow new inputs (64 splits, as at batch 1 on a long context)."""
    sc = decode_scenario([3000, 4096], num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, seed=7)
    rows, lens = sc.tensor(sc.rows, torch.int64), sc.tensor(sc.seq_lens)
    out = torch.empty_like(sc.q)

    def call():
        decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, rows, lens,
                             scale=sc.scale, num_splits=MAX_SPLITS)

    check_graph_replays(sc, call, out, replays=3)


def check_graph_replays(sc, call, out, *, replays, **window):
    """Capture call() (eager first, as the runtime's warm-up: compiles, allocates the counters) in
    a CUDA graph, then replay it on fresh queries against the reference."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(replays):
        sc.q.copy_(torch.randn_like(sc.q))
        out.fill_(float("nan"))
        graph.replay()
        ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                                   scale=sc.scale, **window)
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block_n,num_stages", [(64, 2), (64, 3), (128, 2), (128, 3)])
@pytest.mark.parametrize("merge", ["fused", "kernel"])
@pytest.mark.parametrize("num_splits", [1, 33, 64])
def test_decode_tiles_and_merges_on_gpu(block_n, num_stages, merge, num_splits):
    """Every tile config that bench/kernels.py --sweep may pick, both merges, at a real shape."""
    sc = decode_scenario([5, 3000, 9000], num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         seed=num_splits)
    tiles = dict(BLOCK_N=block_n, num_warps=4, num_stages=num_stages, merge=merge)
    out = run_decode(sc, num_splits=num_splits, tiles=tiles)
    ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens,
                               scale=sc.scale)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim,layout,window", [(128, 128, None), (128, 64, None), (64, 128, None),
                                                    (128, 128, (1000, 4)), (256, 128, None)])
@pytest.mark.parametrize("num_splits", [1, 32])
def test_decode_over_pages_on_gpu(head_dim, layout, window, num_splits):
    """Real TMA loads at real shapes (forced on where the launcher's policy would gather): pages of
    128 (whole tiles), runs of 64 in a pool announced as paged by 128 (gathers), head_dim 64/256,
    a window, and inside a CUDA graph."""
    w, g = window or (None, 0)
    sc = decode_scenario([5, 3000, 9000], num_heads=32, num_kv_heads=8, head_dim=head_dim, dtype=torch.bfloat16,
                         sliding_window=w, global_tokens=g, page_size=layout, seed=num_splits + layout)
    rows, lens = sc.tensor(sc.rows, torch.int64), sc.tensor(sc.seq_lens)
    out = torch.full_like(sc.q, float("nan"))
    tiles = dict(decode_tiles(head_dim, device=sc.q.device, num_splits=num_splits), tma=True)

    def call():
        decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, rows, lens, scale=sc.scale,
                             num_splits=num_splits, sliding_window=w, global_tokens=g, page_size=128, tiles=tiles)

    check_graph_replays(sc, call, out, replays=2, sliding_window=w, global_tokens=g)


@triton.jit
def _late_store_kernel(K_new, V_new, Locs, K_buf, V_buf, Spin, row_elems, ITERS: tl.constexpr,
                       BLOCK: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr):
    """Stores the new tokens' K/V rows after ~ITERS dependent multiply-adds, having let the next
    launch start at once (as the rotary / qkv kernels before decode attention do)."""
    wait_for_previous(USE_PDL)
    allow_dependents(EARLY)
    x = tl.load(Spin)
    for _ in range(ITERS):
        x = x * 0.999 + 1.0
    tl.store(Spin, x)
    tok = tl.program_id(0)
    loc = tl.load(Locs + tok)
    offs = tl.arange(0, BLOCK)
    mask = offs < row_elems
    tl.store(K_buf + loc * row_elems + offs, tl.load(K_new + tok * row_elems + offs, mask=mask), mask=mask)
    tl.store(V_buf + loc * row_elems + offs, tl.load(V_new + tok * row_elems + offs, mask=mask), mask=mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim,num_splits", [(128, 2), (128, 32), (256, 32)])
def test_new_token_stored_by_a_pdl_predecessor(head_dim, num_splits):
    """The split's first tile is read before the PDL wait (early_tile): the new token's row,
    stored by the kernel before (which lets decode attention launch while it still runs), must
    be read after the wait. Here that kernel stores it only after a spin of ~1 ms (longer than the
    host takes to launch decode attention after it), over stale rows."""
    if not pdl.use_pdl(torch.empty(1, device="cuda")):
        pytest.skip("needs PDL (compute capability 9+)")
    sc = decode_scenario([5, 90, 3000], num_heads=32, num_kv_heads=8, head_dim=head_dim, dtype=torch.bfloat16,
                         page_size=128, seed=head_dim + num_splits)
    rows, lens = sc.tensor(sc.rows, torch.int64), sc.tensor(sc.seq_lens)
    ref = decode_attention_ref(sc.q, sc.k_buffer, sc.v_buffer, sc.req_to_token, sc.rows, sc.seq_lens, scale=sc.scale)
    spin = torch.ones(1, device="cuda")
    row_elems = sc.k_new[0].numel()
    for _ in range(3):
        sc.k_buffer[sc.out_cache_loc] = torch.randn_like(sc.k_new)  # stale rows until the late store
        sc.v_buffer[sc.out_cache_loc] = torch.randn_like(sc.v_new)
        out = torch.full_like(sc.q, float("nan"))
        _late_store_kernel[(len(sc.seq_lens),)](sc.k_new, sc.v_new, sc.out_cache_loc, sc.k_buffer, sc.v_buffer, spin,
                                                row_elems, ITERS=500000, BLOCK=triton.next_power_of_2(row_elems),
                                                **pdl.pdl_options(sc.q), EARLY=True)
        decode_attention_fwd(sc.q, sc.k_buffer, sc.v_buffer, out, sc.req_to_token, rows, lens, scale=sc.scale,
                             num_splits=num_splits, page_size=128, early_tile=True)
        assert rel_err(out, ref) < 1e-2
