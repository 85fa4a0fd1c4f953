"""Where the GPU idles inside a server's busy time, and what the host did meanwhile.

Reads the JSON a runtime writes under SGLITE_TIMELINE=path (sglite/runtime/scheduler/stats.py:
every host phase of the loop and every forward's GPU span, on the host's clock) and prints, for
a window (--window T0 T1, perf_counter seconds: the clock is the machine's, so a benchmark's
own timestamps of its timed run serve; bench/structured.py prints them) or else the last busy
stretch (split at host pauses longer than --pause), the GPU's idle gaps between forwards and the
host phases that overlapped them.

    python bench/timeline.py $OUT/timeline.1234.json --window 5123.1 5124.9
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

NESTING = {"extend", "decode"}  # phases that contain others (their parts are charged too)


def busy_stretches(phases, pause: float):
    """[(start, end)] of runs of host phases with no pause longer than `pause` seconds."""
    spans = sorted((t0, t1) for name, t0, t1 in phases if name not in NESTING)
    out = []
    for t0, t1 in spans:
        if out and t0 - out[-1][1] <= pause:
            out[-1][1] = max(out[-1][1], t1)
        else:
            out.append([t0, t1])
    return out


def idle_gaps(forwards, start: float, end: float):
    """GPU idle intervals in [start, end]: the complement of the forwards' GPU spans."""
    spans = sorted((g0, g1) for _, _, g0, g1 in forwards if g1 > start and g0 < end)
    gaps, t = [], start
    for g0, g1 in spans:
        if g0 > t:
            gaps.append((t, g0))
        t = max(t, g1)
    if t < end:
        gaps.append((t, end))
    return gaps


def overlap(a0, a1, b0, b1) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds of host silence that end a stretch")
    ap.add_argument("--window", type=float, nargs=2, help="perf_counter seconds of the timed run")
    ap.add_argument("--gaps", type=int, default=12, help="longest gaps to list")
    args = ap.parse_args()
    data = json.load(open(args.path))
    phases, forwards = data["phases"], data["forwards"]
    if args.window:
        inside = [(t0, t1) for name, t0, t1 in phases
                  if name not in NESTING and args.window[0] <= t0 <= args.window[1]]
        start, end = min(t for t, _ in inside), max(t for _, t in inside)
    else:
        start, end = busy_stretches(phases, args.pause)[-1]
    inside = [f for f in forwards if f[0] >= start - 1e-3 and f[0] <= end]
    gaps = idle_gaps(inside, start, end)
    gpu = sum(min(g1, end) - max(g0, start) for _, _, g0, g1 in inside)
    idle = sum(g1 - g0 for g0, g1 in gaps)
    print(f"stretch {end - start:.3f} s, {len(inside)} forwards, GPU spans {gpu:.3f} s "
          f"(overlapping spans counted once: {end - start - idle:.3f} s), GPU idle {idle:.3f} s")
    leaves = [(name, t0, t1) for name, t0, t1 in phases if name not in NESTING]
    per_gap = []  # (gap, {phase: seconds of it inside the gap})
    by_phase = defaultdict(float)
    for g0, g1 in gaps:
        parts = defaultdict(float)
        for name, t0, t1 in leaves:
            if (o := overlap(g0, g1, t0, t1)) > 0:
                parts[name] += o
                by_phase[name] += o
        per_gap.append(((g0, g1), parts))
    named = sum(by_phase.values())
    print("host phases while the GPU idled (s): " + ", ".join(
        f"{k} {v:.3f}" for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1]) if v >= 5e-4)
        + f"; outside any phase {max(idle - named, 0):.3f}")
    print(f"the {args.gaps} longest gaps (ms from the stretch's start: length, phases inside):")
    for (g0, g1), parts in sorted(per_gap, key=lambda gp: gp[0][0] - gp[0][1])[: args.gaps]:
        desc = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  at {1e3 * (g0 - start):8.1f}: {1e3 * (g1 - g0):6.1f} ms  [{desc}]")
    print("forwards (ms from the stretch's start): host launch start-end | GPU start-end")
    for h0, h1, g0, g1 in inside:
        print(f"  {1e3 * (h0 - start):8.1f} - {1e3 * (h1 - start):8.1f} | "
              f"{1e3 * (g0 - start):8.1f} - {1e3 * (g1 - start):8.1f} ({1e3 * (g1 - g0):.1f})")


if __name__ == "__main__":
    main()
