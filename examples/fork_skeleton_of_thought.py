"""Skeleton-of-thought with s.fork: one skeleton, then every point is expanded in parallel
branches that share the prefix's KV cache, then joined back."""

import os

import sglite as sgl

MAX_TOKENS = int(os.environ.get("SGLITE_EXAMPLE_MAX_TOKENS", 32))


@sgl.function
def skeleton_of_thought(s, topic, num_points=3):
    s += "Here are " + str(num_points) + " tips for " + topic + ".\n"
    for i in range(num_points):
        s += f"{i + 1}. " + sgl.gen(f"tip_{i}", max_tokens=8, stop="\n", temperature=0) + "\n"
    forks = s.fork(num_points)
    forks += lambda i: ("Now explain tip " + str(i + 1) + " in one sentence:"
                        + sgl.gen("detail", max_tokens=MAX_TOKENS, stop="\n", temperature=0))
    forks.join()  # gather_variable: s["detail"] is the list of branch results
    s += "In summary: " + sgl.gen("summary", max_tokens=MAX_TOKENS, stop="\n", temperature=0)


def main():
    address = os.environ.get("SGLITE_RUNTIME_ADDRESS")
    backend = sgl.RuntimeEndpoint(address) if address else sgl.Runtime()
    try:
        state = skeleton_of_thought.run("staying healthy", backend=backend)
        for i, detail in enumerate(state["detail"]):
            print(f"{i + 1}. {state[f'tip_{i}'].strip()}\n   {detail.strip()}")
        print("summary:", state["summary"].strip())
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
