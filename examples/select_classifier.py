"""A classifier with sgl.select: every label is scored in one prefill-only request, and the
choice method decides (token_length_normalized by default; see sglite/choices.py)."""

import os

import sglite as sgl


@sgl.function
def classify(s, review):
    s += "Classify the sentiment of each review as positive or negative.\n"
    s += "Review: I loved every minute of it.\nSentiment: positive\n"
    s += "Review: A boring, badly acted film.\nSentiment: negative\n"
    s += "Review: " + review + "\nSentiment: "
    s += sgl.select("label", choices=["positive", "negative"])


def main():
    address = os.environ.get("SGLITE_RUNTIME_ADDRESS")
    backend = sgl.RuntimeEndpoint(address) if address else sgl.Runtime()
    reviews = ["What a wonderful, moving story.", "Terrible. I walked out after an hour."]
    try:
        for review, state in zip(reviews, classify.run_batch([{"review": r} for r in reviews],
                                                             backend=backend)):
            scores = state.get_meta_info("label")["normalized_prompt_logprobs"]
            print(f"{review!r}: {state['label']}  (mean logprobs {[round(x, 2) for x in scores]})")
        # The other two methods, eagerly:
        for method in (sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized):
            @sgl.function
            def classify_with(s, review):
                s += "Review: " + review + "\nSentiment: "
                s += sgl.select("label", ["positive", "negative"], choices_method=method)

            print(method, classify_with.run(reviews[0], backend=backend)["label"])
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
