from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglite.runtime.sampling.detokenizer import IncrementalDetokenizer, StopMatcher

PIECES = ["Hello", " world", "!", " 你好，世界", "🎉🎉", " naïve café", " 😀👍🏽", "\n\n", " ok",
          "日本語のテキスト", " Ünïcödé", "🇫🇷", " a . b", " x"]


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


def _stream(tok, ids, prompt_ids=(), skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(t) for t in ids]
    return deltas, detok.flush()


def _whole(tok, ids, skip_special_tokens=True):
    return tok.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def test_valid_text_streams_without_broken_characters(tokenizer):
    rng = random.Random(0)
    prompt = tokenizer.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    for _ in range(20):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas, tail = _stream(tokenizer, ids, prompt)
        assert "".join(deltas) == text and tail == ""
        assert not any("\ufffd" in d for d in deltas), deltas
    # a multi-byte character split over byte tokens is held until complete
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1 and _stream(tokenizer, ids)[0] == [""] * (len(ids) - 1) + ["🎉"]


def test_random_token_ids_match_whole_decode(tokenizer):
    rng = random.Random(1)
    vocab = len(tokenizer)
    valid = tokenizer.encode("".join(PIECES), add_special_tokens=False)
    for skip in (True, False):
        for _ in range(60):
            # random ids (broken UTF-8 included), real multi-byte tokens and special tokens
            ids = [rng.choice([rng.randrange(vocab), rng.choice(valid), rng.randrange(17)])
                   for _ in range(rng.randint(1, 25))]
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
            deltas, tail = _stream(tokenizer, ids, prompt, skip_special_tokens=skip)
            assert "".join(deltas) + tail == _whole(tokenizer, ids, skip), ids


def test_leading_space_and_no_cleanup(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    ids = tokenizer.encode(" world . ok", add_special_tokens=False)
    deltas, _ = _stream(tokenizer, ids, prompt)
    assert deltas[0] == " world" and "".join(deltas) == " world . ok"


def test_stop_string_across_deltas_never_leaks(tokenizer):
    text = "The answer is 42.\n\nNext question: 你好🎉 END of text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stop in ["\n\n", "42.", "你好🎉", " END", "text", "q"]:
        detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher([stop, "never seen"])
        out, matched = "", None
        for t in ids:
            emit, matched = matcher.feed(detok.append(t))
            out += emit
            assert stop not in out
            if matched:
                break
        assert matched == stop and out == text[:text.index(stop)]


def _reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    hits = [(text.index(s) + len(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    _, _, stop = min(hits)
    return text[:text.index(stop)], stop


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.text(alphabet="ab\nc", max_size=5), max_size=8),
       stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_matcher_any_chunking_equals_whole_text(chunks, stops):
    matcher = StopMatcher(stops)
    out, matched = "", None
    for chunk in chunks:
        emit, matched = matcher.feed(chunk)
        out += emit
        if matched:
            break
    if matched is None:
        out += matcher.flush()
    assert (out, matched) == _reference("".join(chunks), stops)


def test_stop_matcher_holds_partial_and_rejects_empty():
    m = StopMatcher(["</end>"])
    assert m.feed("abc</e") == ("abc", None)
    assert m.feed("nd") == ("", None)
    assert m.feed("x") == ("</endx", None)
    assert m.feed("</end> tail") == ("", "</end>")
    assert m.feed("more") == ("", "</end>")
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])


def test_fast_tokenizers_stream_in_rust_with_the_python_paths_text(tokenizer):
    """The Rust DecodeStream path (fast tokenizers) and the Python window path give the same
    deltas, held-back partial characters and flush included."""
    import random

    rng = random.Random(3)
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=False)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        fast = IncrementalDetokenizer(tokenizer, prompt)
        slow = IncrementalDetokenizer(tokenizer, prompt)
        assert fast._stream is not None
        slow._stream = None
        assert [fast.append(t) for t in ids] == [slow.append(t) for t in ids]
        assert fast.flush() == slow.flush()
