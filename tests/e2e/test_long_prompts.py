"""Long texts (handlers.TOKENIZE_OFF_LOOP_CHARS and more) are tokenized off the runtime's loop:
what comes back is what the same prompt gives as input_ids, errors still name the problem, and an
abort that arrives while the text is being tokenized ends the request as an abort."""

import pytest

from sglite import protocol
from sglite.runtime.server.handlers import TOKENIZE_OFF_LOOP_CHARS

GREEDY = {"temperature": 0, "max_new_tokens": 3}
# long in characters, short in tokens (runs of "=" are long tokens): ~520 tokens to prefill
LONG = "Once upon a time: " + "=" * TOKENIZE_OFF_LOOP_CHARS + " The end."


@pytest.fixture(scope="module")
def tokenizer():
    from sglite.runtime.models.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


def test_a_long_text_gives_what_its_ids_give(client, tokenizer):
    text = LONG
    by_text = client.generate(text, sampling_params=GREEDY)
    by_ids = client.generate(input_ids=tokenizer(text).input_ids, sampling_params=GREEDY)
    assert by_text["error"] is None and by_ids["error"] is None
    assert by_text["meta_info"]["prompt_tokens"] == len(tokenizer(text).input_ids)
    assert by_text["text"] == by_ids["text"]


def test_a_text_too_long_in_tokens_is_refused_and_a_later_request_served(client):
    ctx = client.info()["context_length"]
    big, small = client.new_rid(), client.new_rid()
    text = "1 " * max(ctx, TOKENIZE_OFF_LOOP_CHARS // 2 + 1)  # tokenized off the loop, then refused
    client.send(protocol.GenerateReq(rid=big, text=text, sampling_params=GREEDY))
    client.send(protocol.GenerateReq(rid=small, text="Hello", sampling_params=GREEDY))
    results = client.collect([big, small])
    assert "context length" in results[big]["error"] and str(ctx) in results[big]["error"]
    assert results[small]["error"] is None and results[small]["meta_info"]["completion_tokens"] == 3


def test_an_abort_sent_with_a_long_text_ends_it_as_an_abort(client):
    rid = client.new_rid()
    client.send(protocol.GenerateReq(rid=rid, text=LONG,
                                     sampling_params={"temperature": 0, "max_new_tokens": 200}))
    client.send(protocol.AbortReq(rid=rid))
    result = client.collect([rid])[rid]
    assert result["error"] is None and result["meta_info"]["finish_reason"]["type"] == "abort"
