"""Few-shot question answering over a batch: run_batch sends each program as one request graph,
and the shared few-shot prefix is prefilled once and reused from the radix cache."""

import os

import sglite as sgl

MAX_TOKENS = int(os.environ.get("SGLITE_EXAMPLE_MAX_TOKENS", 16))

SHOTS = """Question: What is the capital of Germany?
Answer: Berlin
Question: What is the capital of Spain?
Answer: Madrid
Question: What is the capital of Japan?
Answer: Tokyo
"""


@sgl.function
def few_shot_qa(s, question):
    s += SHOTS
    s += "Question: " + question + "\n"
    s += "Answer:" + sgl.gen("answer", max_tokens=MAX_TOKENS, stop="\n", temperature=0)


def main():
    address = os.environ.get("SGLITE_RUNTIME_ADDRESS")
    backend = sgl.RuntimeEndpoint(address) if address else sgl.Runtime()
    questions = ["What is the capital of France?", "What is the capital of Italy?",
                 "What is the capital of England?", "What is the capital of Canada?"]
    try:
        states = few_shot_qa.run_batch([{"question": q} for q in questions], backend=backend,
                                       progress_bar=True)
        for q, state in zip(questions, states):
            meta = state.get_meta_info("answer")
            print(f"{q} ->{state['answer']}   (cached {meta.get('cached_tokens')} of "
                  f"{meta.get('prompt_tokens')} prompt tokens)")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
