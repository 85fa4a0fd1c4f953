"""Frontend: a program of 8 gens in sequence, sent node by node (eager run) vs as one request
graph (compiled run), in the same run on the same runtime.

    .venv/bin/python bench/graph_vs_eager.py [--reps 5] [--max-tokens 8] [--address ipc://...]

Each repetition uses a fresh topic for both modes, so neither mode gains from the other's cache
beyond the shared constant prefix; the modes alternate order to cancel drift.
"""

from __future__ import annotations

import argparse
import itertools
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


def time_eager_batch(backend, topics: list[str], max_tokens: int) -> float:
    start = time.perf_counter()
    states = [eight_steps.run(t, max_tokens, backend=backend) for t in topics]
    for state in states:
        state.sync()
        if state.error():
            raise state.error()
    return time.perf_counter() - start


def time_graph_batch(compiled, backend, topics: list[str], max_tokens: int) -> float:
    start = time.perf_counter()
    for state in compiled.run_batch([{"topic": t, "num_tokens": max_tokens} for t in topics],
                                    backend=backend):
        if state.error():
            raise state.error()
    return time.perf_counter() - start


def measure(backend, compiled, max_tokens: int, reps: int, topics, num_programs: int) -> dict:
    eager, graph = [], []
    for rep in range(reps):
        a = [next(topics) for _ in range(num_programs)]
        b = [next(topics) for _ in range(num_programs)]
        order = ("eager", "graph") if rep % 2 == 0 else ("graph", "eager")
        for mode in order:
            if mode == "eager" and num_programs == 1:
                eager.append(time_eager(backend, a[0], max_tokens)[0])
            elif mode == "eager":
                eager.append(time_eager_batch(backend, a, max_tokens))
            elif num_programs == 1:
                graph.append(time_graph(compiled, backend, b[0], max_tokens)[0])
            else:
                graph.append(time_graph_batch(compiled, backend, b, max_tokens))
    diffs = sorted(e - g for e, g in zip(eager, graph))  # paired: cancels slow drift
    return {"eager": statistics.median(eager), "graph": statistics.median(graph),
            "saved_per_node_ms": 1000 * statistics.median(diffs) / NUM_GENS / num_programs}


def round_trip_ms(backend, num: int = 200) -> float:
    """Median client->runtime->client latency of a tiny request (what a graph saves per node)."""
    times = []
    for _ in range(num):
        start = time.perf_counter()
        backend.get_server_info()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch", type=int, default=8, help="concurrent programs, second table")
    parser.add_argument("--address", default=None, help="attach to a running runtime")
    args = parser.parse_args()
    backend = sgl.RuntimeEndpoint(args.address) if args.address else sgl.Runtime(dtype="float32")
    topics = itertools.cycle([f"topic number {i}" for i in range(1000)])
    try:
        compiled = eight_steps.compile(backend=backend)
        time_eager(backend, "warm-up", 2)  # prefix into the cache, lazy inits
        # Same prompt both ways gives the same greedy text (a correctness check on the graph).
        same = time_eager(backend, "maps", 4)[1] == time_graph(compiled, backend, "maps", 4)[1]
        print(f"machine: {machine()}; model: {backend.info.get('model_path')}")
        print(f"program: {NUM_GENS} gens in sequence; reps={args.reps} interleaved pairs; "
              f"identical greedy text both ways: {same}")
        print(f"client round trip (InfoReq over {backend.client.address.split(':')[0]}): "
              f"{round_trip_ms(backend):.2f} ms median")
        print("| programs | max_tokens per gen | node by node (run), median s | request graph "
              "(compiled run / run_batch), median s | ratio | saved per node, ms |")
        print("|---|---|---|---|---|---|")
        for num_programs in (1, args.batch):
            for max_tokens in args.max_tokens:
                r = measure(backend, compiled, max_tokens, args.reps, topics, num_programs)
                print(f"| {num_programs} | {max_tokens} | {r['eager']:.3f} | {r['graph']:.3f} | "
                      f"{r['eager'] / r['graph']:.2f}x | {r['saved_per_node_ms']:.1f} |",
                      flush=True)
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
