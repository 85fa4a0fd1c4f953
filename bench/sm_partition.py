"""Can one micro-batch's decode attention (memory-bound) run beside the other's matmuls
(compute-bound), so that a decode step beats running its kernels one after another?

    python bench/sm_partition.py [--micro-batch 512] [--context 640] [--att-sms 40,56]

Llama-3-8B decode shapes (32 layers, 8 weight sets cycled so weights come from HBM), two
micro-batches A and B of --micro-batch requests each, every request --context KV tokens on the
GPU server's paged pool. Per layer: pre = the qkv matmul, attention (sglite's decode kernel),
post = o, gate_up and down matmuls (norms and activations left out: they are small).
  serial:     A's 32 layers, then B's, one stream (what sglite does; the baseline of every row)
  pipelined:  matmuls on one stream, attention on another; A's attention of layer l runs while
              the matmul stream does B's post(l-1) and pre(l), B's while it does A's post(l) and
              pre(l+1). On two plain streams, then on two CUDA green contexts that split the SMs
              (driver API through ctypes: torch's GreenContext.create(num_sms) gives every context
              the same SMs, so two of them do not partition the card).
Prints the card and a table: ms per step (median of event-timed runs) and serial / row (> 1:
faster than the baseline). Needs CUDA 12.4+ for green contexts.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglite.kernels.decode_attention import decode_attention_fwd  # noqa: E402
from sglite.kernels.decode_policy import decode_num_splits  # noqa: E402
from kernels import PAGE, make_pool  # noqa: E402  (bench/kernels.py)
from timing import event_ms as timed  # noqa: E402

DEV = torch.device("cuda")
H, KH, D, HIDDEN, FFN = 32, 8, 128, 4096, 14336
LAYERS, WEIGHT_SETS = 32, 8
BF16 = torch.bfloat16
# attention tiles for a partition (bench on H200, 56 of 132 SMs: bulk 128-key tiles with 3 stages
# read at 0.80 of the whole card's rate, the default gather tiles at 0.63)
PARTITION_TILES = dict(BLOCK_N=128, num_warps=4, num_stages=3, merge="fused", tma=True)


def green_streams(num_sms: int) -> list[tuple[torch.cuda.ExternalStream, int]]:
    """Two green contexts on disjoint SMs (num_sms, rounded up by the driver, and the rest) and a
    stream on each: [(stream, its SM count)] x 2."""
    cu = ctypes.CDLL("libcuda.so.1")
    res_bytes = 2048  # > sizeof(CUdevResource); smCount sits at byte 96 (after type and padding)

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    dev = ctypes.c_int()
    check(cu.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device()), "cuDeviceGet")
    whole = ctypes.create_string_buffer(res_bytes)
    check(cu.cuDeviceGetDevResource(dev, whole, 1), "cuDeviceGetDevResource")  # 1: SM resource
    first, rest = ctypes.create_string_buffer(res_bytes), ctypes.create_string_buffer(res_bytes)
    check(cu.cuDevSmResourceSplitByCount(first, ctypes.byref(ctypes.c_uint(1)), whole, rest, 0, num_sms),
          "cuDevSmResourceSplitByCount")
    out = []
    for part in (first, rest):
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        check(cu.cuDevResourceGenerateDesc(ctypes.byref(desc), part, 1), "cuDevResourceGenerateDesc")
        check(cu.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, 1), "cuGreenCtxCreate")
        check(cu.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, 1, 0), "cuGreenCtxStreamCreate")
        out.append((torch.cuda.ExternalStream(stream.value), int.from_bytes(part.raw[96:100], "little")))
    return out


class DecodeStep:
    """The matmuls and attention of a decode step for two micro-batches."""

    def __init__(self, micro_batch: int, context: int):
        gen = torch.Generator(device=DEV).manual_seed(0)

        def weight(k, n):
            return torch.randn(k, n, device=DEV, dtype=BF16, generator=gen) * 0.02

        self.weights = [dict(qkv=weight(HIDDEN, (H + 2 * KH) * D), o=weight(H * D, HIDDEN),
                             gate_up=weight(HIDDEN, 2 * FFN), down=weight(FFN, HIDDEN))
                        for _ in range(WEIGHT_SETS)]
        self.k_buf, self.v_buf, self.req_to_token, _ = make_pool([context] * (2 * micro_batch), layout="pages")
        rows = torch.arange(2 * micro_batch, device=DEV)
        lens = torch.full((2 * micro_batch,), context, dtype=torch.int32, device=DEV)
        num_sms = torch.cuda.get_device_properties(DEV).multi_processor_count
        self.num_splits = decode_num_splits(micro_batch, KH, num_sms=num_sms, max_kv_len=context)
        self.tiles = None  # decode_tiles() defaults

        def buffers(part):
            def empty(n):
                return torch.empty(micro_batch, n, device=DEV, dtype=BF16)
            return dict(x=torch.randn(micro_batch, HIDDEN, device=DEV, dtype=BF16, generator=gen),
                        qkv=empty((H + 2 * KH) * D), att=empty(H * D), h=empty(HIDDEN), gate_up=empty(2 * FFN),
                        y=empty(HIDDEN), rows=rows[part], lens=lens[part])

        self.a = buffers(slice(0, micro_batch))
        self.b = buffers(slice(micro_batch, 2 * micro_batch))

    def pre(self, mb, layer):
        torch.matmul(mb["x"], self.weights[layer % WEIGHT_SETS]["qkv"], out=mb["qkv"])

    def attention(self, mb, layer):
        q = mb["qkv"][:, : H * D].view(-1, H, D)
        decode_attention_fwd(q, self.k_buf, self.v_buf, mb["att"].view(-1, H, D), self.req_to_token,
                             mb["rows"], mb["lens"], scale=D ** -0.5, num_splits=self.num_splits,
                             page_size=PAGE, tiles=self.tiles)

    def post(self, mb, layer):
        w = self.weights[layer % WEIGHT_SETS]
        torch.matmul(mb["att"], w["o"], out=mb["h"])
        torch.matmul(mb["h"], w["gate_up"], out=mb["gate_up"])
        torch.matmul(mb["gate_up"][:, :FFN], w["down"], out=mb["y"])

    def serial(self, matmuls=True, attention=True):
        for mb in (self.a, self.b):
            for layer in range(LAYERS):
                if matmuls:
                    self.pre(mb, layer)
                if attention:
                    self.attention(mb, layer)
                if matmuls:
                    self.post(mb, layer)

    def pipelined(self, mm_stream, att_stream):
        cur = torch.cuda.current_stream()
        mm_stream.wait_stream(cur)
        att_stream.wait_stream(cur)
        a, b = self.a, self.b
        a_q, a_att, b_q, b_att = (torch.cuda.Event() for _ in range(4))
        for layer in range(LAYERS):
            with torch.cuda.stream(mm_stream):
                self.pre(a, layer)
                a_q.record()
            with torch.cuda.stream(att_stream):
                att_stream.wait_event(a_q)
                self.attention(a, layer)
                a_att.record()
            with torch.cuda.stream(mm_stream):
                if layer:
                    mm_stream.wait_event(b_att)
                    self.post(b, layer - 1)
                self.pre(b, layer)
                b_q.record()
            with torch.cuda.stream(att_stream):
                att_stream.wait_event(b_q)
                self.attention(b, layer)
                b_att.record()
            with torch.cuda.stream(mm_stream):
                mm_stream.wait_event(a_att)
                self.post(a, layer)
        with torch.cuda.stream(mm_stream):
            mm_stream.wait_event(b_att)
            self.post(b, LAYERS - 1)
        cur.wait_stream(mm_stream)
        cur.wait_stream(att_stream)


def l2_resident_matmuls():
    """A loop of 1200 matmuls of 2048 x 2048 bf16: 24 MB of operands, which stay in L2."""
    x, w = (torch.randn(2048, 2048, device=DEV, dtype=BF16) for _ in range(2))
    y = torch.empty_like(x)

    def loop():
        for _ in range(1200):
            torch.matmul(x, w, out=y)
    return loop


def at_once(*pairs):
    """Run each (stream, fn) on its stream, all launched before any is waited for."""
    def run():
        cur = torch.cuda.current_stream()
        for stream, _ in pairs:
            stream.wait_stream(cur)
        for stream, fn in pairs:
            with torch.cuda.stream(stream):
                fn()
        for stream, _ in pairs:
            cur.wait_stream(stream)
    return run


def on(stream, fn):
    return at_once((stream, fn))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch", type=int, default=512)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--att-sms", default="40,56", help="SMs for attention (comma-separated)")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(DEV)
    print(f"card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"2 x {args.micro_batch} requests x {args.context} KV tokens, {LAYERS} layers", flush=True)
    step = DecodeStep(args.micro_batch, args.context)
    rows = []

    def row(case, ms):
        rows.append((case, ms))
        print(f"  {case}: {ms:.2f} ms", flush=True)

    row("serial, one stream (baseline)", timed(step.serial))
    row("  matmuls alone", timed(lambda: step.serial(attention=False)))
    row("  attention alone", timed(lambda: step.serial(matmuls=False)))
    streams = torch.cuda.Stream(), torch.cuda.Stream()
    l2_loop = l2_resident_matmuls()
    row("pipelined, two plain streams", timed(lambda: step.pipelined(*streams)))
    for n in (int(x) for x in args.att_sms.split(",")):
        (att_stream, att_sms), (mm_stream, mm_sms) = green_streams(n)
        ref = torch.empty_like(step.a["att"])
        step.tiles = None
        step.attention(step.a, 0)
        torch.cuda.synchronize()
        ref.copy_(step.a["att"])
        for tiles_name, tiles in (("default tiles", None), ("bulk 128 x 3 stages", PARTITION_TILES)):
            step.tiles = tiles
            step.a["att"].fill_(float("nan"))
            on(att_stream, lambda: step.attention(step.a, 0))()
            torch.cuda.synchronize()
            same = torch.allclose(step.a["att"].float(), ref.float(), atol=2e-2, rtol=0)
            row(f"  attention alone on {att_sms} SMs, {tiles_name}{'' if same else ' (WRONG OUTPUT)'}",
                timed(on(att_stream, lambda: step.serial(matmuls=False)), reps=3))
        row(f"  matmuls alone on {mm_sms} SMs", timed(on(mm_stream, lambda: step.serial(attention=False)), reps=3))
        step.tiles = PARTITION_TILES
        # independent loops, both partitions at once: do they keep their times alone?
        attention_only, matmuls_only = (lambda: step.serial(matmuls=False)), (lambda: step.serial(attention=False))
        row("  attention and matmuls alone, independent, at once",
            timed(at_once((att_stream, attention_only), (mm_stream, matmuls_only)), reps=3))
        row(f"  an L2-resident matmul loop alone on {mm_sms} SMs", timed(on(mm_stream, l2_loop), reps=3))
        row("  the same beside attention, at once", timed(at_once((att_stream, attention_only), (mm_stream, l2_loop)), reps=3))
        row(f"pipelined, attention on {att_sms} SMs | matmuls on {mm_sms}",
            timed(lambda: step.pipelined(mm_stream, att_stream)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.pipelined(mm_stream, att_stream)
        row("  same, as one CUDA graph", timed(graph.replay))
        step.tiles = None
    row("serial, one stream (baseline, again)", timed(step.serial))
    base = min(rows[0][1], rows[-1][1])
    print(f"\n{props.name}\n| case | ms per decode step | serial / case |\n| --- | --- | --- |")
    for case, ms in rows:
        print(f"| {case} | {ms:.2f} | {base / ms:.2f} |")


if __name__ == "__main__":
    main()
