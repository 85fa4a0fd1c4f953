"""GPU benchmark of sampling (SamplingBatch.sample) on Llama-3's vocabulary (128256), with the
sort-based top-k/top-p filter (the former implementation, now the CPU path) timed beside the
threshold-bisection kernel in the same run.

    python bench/sampling.py

Prints the card, then per batch size and parameters the microseconds of one `sample` call (CUDA
events, median of 50; its inputs already on the device) as the sampler runs it (the search from
TOP_K_TOP_P_KERNEL_MIN_BS rows) and with the sort, and their ratio; then the filter alone, and how
far its kept sets are from the sort's (mass sums in another order: rows whose cut lands within
float rounding of top_p differ by a few tokens). Logits: N(0, s^2) rounded to bf16 (ties, as a
bf16 model's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sglite.runtime.sampling.sampler as sampler_module  # noqa: E402
from sglite.kernels.reference import top_k_top_p_filter_ref  # noqa: E402
from sglite.kernels.top_k_top_p import NO_TOP_K, top_k_top_p_filter  # noqa: E402
from sglite.protocol import SamplingParams  # noqa: E402
from sglite.runtime.sampling.sampler import SamplingBatch  # noqa: E402
from timing import event_ms  # noqa: E402  (bench/timing.py)

VOCAB = 128256
CASES = {"greedy": dict(temperature=0), "temperature 0.8": dict(temperature=0.8),
         "top_p 0.9": dict(temperature=0.8, top_p=0.9), "top_k 50": dict(temperature=0.8, top_k=50),
         "top_k 50 + top_p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
         "min_p 0.05": dict(temperature=0.8, min_p=0.05)}


def micros(fn) -> float:
    return event_ms(fn, reps=50) * 1000


def main():
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows = []
    for bs in (1, 8, 64, 256):
        logits = (torch.randn(bs, VOCAB, device="cuda") * 4).to(torch.bfloat16).float()
        for name, kw in CASES.items():
            batch = SamplingBatch.from_requests([SamplingParams(**kw)] * bs, [[]] * bs, device="cuda")
            new = micros(lambda: batch.sample(logits))
            sampler_module.top_k_top_p_filter = top_k_top_p_filter_ref  # the former GPU path
            old = micros(lambda: batch.sample(logits))
            sampler_module.top_k_top_p_filter = top_k_top_p_filter
            rows.append((f"bs {bs}, {name}", new, "sort", old))
            print(f"  {rows[-1][0]}: {new:.0f} us vs sort {old:.0f} us", flush=True)
        for scale in (4.0, 1.0):  # peaked and flatter rows
            probs = torch.softmax((torch.randn(bs, VOCAB, device="cuda") * scale).to(torch.bfloat16).float(), dim=-1)
            ks = torch.full((bs,), NO_TOP_K, dtype=torch.int64, device="cuda")
            ps = torch.full((bs,), 0.9, device="cuda")
            new_kept, old_kept = top_k_top_p_filter(probs, ks, ps) > 0, top_k_top_p_filter_ref(probs, ks, ps) > 0
            differ = (new_kept != old_kept).sum(-1)
            note = (f"rows kept alike {(differ == 0).sum().item()}/{bs}, at most {differ.max().item()} tokens "
                    f"of {old_kept.sum(-1).min().item()}+ apart")
            rows.append((f"bs {bs}, filter alone, top_p 0.9, logits N(0, {scale:g}^2): {note}",
                         micros(lambda: top_k_top_p_filter(probs, ks, ps)), "sort",
                         micros(lambda: top_k_top_p_filter_ref(probs, ks, ps))))
    print(f"\n{torch.cuda.get_device_name()}\n| case | us | baseline | baseline us | speed-up |\n| --- | --- | --- | --- | --- |")
    for case, new, base, old in rows:
        print(f"| {case} | {new:.0f} | {base} | {old:.0f} | {old / new:.2f} |")


if __name__ == "__main__":
    main()
