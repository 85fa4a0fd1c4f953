"""Frontend: a program of 8 gens in sequence, sent node by node (eager run) vs as one request
graph (compiled run), in the same run on the same runtime.

    .venv/bin/python bench/graph_vs_eager.py [--reps 5] [--max-tokens 8] [--address ipc://...]

Each repetition uses a fresh topic for both modes, so neither mode gains from the other's cache
beyond the shared constant prefix; the modes alternate order to cancel drift.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import sglite as sgl

NUM_GENS = 8


@sgl.function
def eight_steps(s, topic, num_tokens):
    s += "Write eight short facts about " + topic + ", one per line.\n"
    for i in range(NUM_GENS):
        s += str(i + 1) + "." + sgl.gen(f"fact_{i}", max_tokens=num_tokens, stop="\n",
                                        temperature=0) + "\n"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def time_eager(backend, topic: str, max_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    state = eight_steps.run(topic, max_tokens, backend=backend)
    text = state.text()
    if state.error():
        raise state.error()
    return time.perf_counter() - start, text


def time_graph(compiled, backend, topic: str, max_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    state = compiled.run(topic=topic, num_tokens=max_tokens, backend=backend)
    text = state.text()
    if state.error():
        raise state.error()
    return time.perf_counter() - start, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--address", default=None, help="attach to a running runtime")
    args = parser.parse_args()
    backend = sgl.RuntimeEndpoint(args.address) if args.address else sgl.Runtime(dtype="float32")
    try:
        compiled = eight_steps.compile(backend=backend)
        time_eager(backend, "warm-up", args.max_tokens)  # prefix into the cache, lazy inits
        eager, graph = [], []
        topics = ["the sea", "volcanoes", "owls", "bread", "glaciers", "trains", "bees", "salt",
                  "copper", "clouds", "tea", "rivers"]
        for rep in range(args.reps):
            a, b = topics[(2 * rep) % len(topics)], topics[(2 * rep + 1) % len(topics)]
            first_eager = rep % 2 == 0
            for mode in (("eager", "graph") if first_eager else ("graph", "eager")):
                topic = a if mode == "eager" else b
                if mode == "eager":
                    eager.append(time_eager(backend, topic, args.max_tokens)[0])
                else:
                    graph.append(time_graph(compiled, backend, topic, args.max_tokens)[0])
        # Same prompt both ways gives the same greedy text (a correctness check on the graph).
        same = time_eager(backend, "maps", args.max_tokens)[1] == \
            time_graph(compiled, backend, "maps", args.max_tokens)[1]
        e, g = statistics.median(eager), statistics.median(graph)
        print(f"machine: {machine()}; model: {backend.info.get('model_path')}")
        print(f"program: {NUM_GENS} gens in sequence, max_tokens={args.max_tokens}, "
              f"reps={args.reps}; identical text both ways: {same}")
        print(f"| mode | median s | min s |")
        print(f"|---|---|---|")
        print(f"| node by node (run) | {e:.3f} | {min(eager):.3f} |")
        print(f"| request graph (compile().run) | {g:.3f} | {min(graph):.3f} |")
        print(f"| ratio node-by-node / graph | {e / g:.2f}x | |")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
