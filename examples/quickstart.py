"""Quickstart: one @sgl.function on the embedded SmolLM2-135M-Instruct.

    python examples/quickstart.py        (make demo)

SGLITE_RUNTIME_ADDRESS=ipc://... attaches to a running runtime instead of starting one;
SGLITE_EXAMPLE_MAX_TOKENS shortens generations (the tests use both).
"""

import os

import sglite as sgl

MAX_TOKENS = int(os.environ.get("SGLITE_EXAMPLE_MAX_TOKENS", 48))


@sgl.function
def answer(s, question):
    # SmolLM2-135M answers simple questions well with a short system prompt like this one.
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=MAX_TOKENS, temperature=0))


def main():
    address = os.environ.get("SGLITE_RUNTIME_ADDRESS")
    backend = sgl.RuntimeEndpoint(address) if address else sgl.Runtime()
    sgl.set_default_backend(backend)
    try:
        state = answer.run("What is the capital of France?")
        print("Q: What is the capital of France?")
        print("A:", state["answer"])
        meta = state.get_meta_info("answer")
        print(f"({meta['prompt_tokens']} prompt tokens, {meta['completion_tokens']} generated)")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
