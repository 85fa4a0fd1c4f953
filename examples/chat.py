"""Multi-turn chat: roles render through the model's own chat template; each turn's prompt
extends the previous one, so the runtime reuses the conversation's KV cache."""

import os

import sglite as sgl

MAX_TOKENS = int(os.environ.get("SGLITE_EXAMPLE_MAX_TOKENS", 48))


@sgl.function
def multi_turn(s, questions):
    s += sgl.system("You are a helpful assistant.")
    for i, question in enumerate(questions):
        with s.user():
            s += question
        with s.assistant():
            s += sgl.gen(f"answer_{i}", max_tokens=MAX_TOKENS, temperature=0)


def main():
    address = os.environ.get("SGLITE_RUNTIME_ADDRESS")
    backend = sgl.RuntimeEndpoint(address) if address else sgl.Runtime()
    try:
        state = multi_turn.run(["What is the capital of France?", "And of Italy?"],
                               backend=backend)
        for message in state.messages():
            print(f"{message['role']:>9}: {message['content']}")
        print("cached tokens in turn 2:", state.get_meta_info("answer_1")["cached_tokens"])
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
