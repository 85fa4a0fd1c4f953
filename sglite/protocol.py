"""Messages that cross the ZeroMQ socket between a client (sglite.lang) and the runtime.

One codec (msgpack through msgspec), typed structs, a tagged union so that one decoder reads
every message. Never pickle: a socket that unpickles runs whatever arrives.

Transport: the runtime binds a ROUTER; each client holds a DEALER and sends single-frame messages
(encode(msg)). The runtime replies to the sender's identity with one or more frames, each one
encoded message. Every request carries a client-chosen `rid` (unique per client) and every reply
echoes it. This module imports nothing but msgspec, so both `lang` and `runtime` can use it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Union

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The one definition of sampling parameters (frontend `gen` arguments map onto these)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    stop_regex: list[str] = []  # the output ends at the end of the first match (kept in it)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    seed: int | None = None
    # Constrained decoding: at most one of these.
    regex: str | None = None
    json_schema: str | None = None  # a JSON string
    grammar: str | None = None  # Lark EBNF
    skip_special_tokens: bool = True


# ---- client -> runtime ---------------------------------------------------------------------


class GenerateReq(msgspec.Struct, tag="generate", kw_only=True):
    rid: str
    text: str | None = None  # exactly one of text / input_ids
    input_ids: list[int] | None = None
    # A plain dict on the wire so that the runtime can name an unknown key in its error.
    sampling_params: dict[str, Any] = {}
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only
    top_logprobs_num: int = 0


class ScoreReq(msgspec.Struct, tag="score", kw_only=True):
    """`select`: score each choice as a continuation of `text` in one batched prefill-only pass.

    The runtime tokenizes `text` alone (P tokens) and `text + choice` for each choice, prefills the
    shared prefix once, and returns for each choice the logprob of every token of `text + choice`
    from index max(P - 1, 1) on: the first one is the boundary token (the prefix's last token, or the
    token that fused prefix and choice: token healing); the frontend drops it when the prefix text
    ends with that token's text, as SGLang does. With `unconditional=True` it also scores each
    choice's tokens alone (for unconditional_likelihood_normalized)."""

    rid: str
    text: str
    choices: list[str]
    unconditional: bool = False


class AbortReq(msgspec.Struct, tag="abort", kw_only=True):
    rid: str


class FlushCacheReq(msgspec.Struct, tag="flush_cache", kw_only=True):
    rid: str


class InfoReq(msgspec.Struct, tag="info", kw_only=True):
    rid: str
    # also run the KV accounting checks (radix tree, token pool) now; info["integrity"] is "ok"
    # or the first broken invariant
    check_integrity: bool = False


# ---- runtime -> client ---------------------------------------------------------------------


class GenerateOut(msgspec.Struct, tag="out", kw_only=True):
    """One streamed chunk (stream=True) or the whole result (stream=False).

    meta_info keys: prompt_tokens, completion_tokens, cached_tokens, finish_reason
    ({"type": "stop"|"length"|"abort", "matched": str|int|None}) on the last chunk, and with
    return_logprob: input_token_logprobs / output_token_logprobs as [logprob, token_id, text]
    lists, input_top_logprobs / output_top_logprobs as lists of such lists."""

    rid: str
    text: str  # the new text since the previous chunk (delta), or the whole text if not streaming
    finished: bool
    meta_info: dict[str, Any] = {}
    output_ids: list[int] | None = None  # every output token id, on the last message only


class ScoreOut(msgspec.Struct, tag="score_out", kw_only=True):
    rid: str
    # one list per choice, aligned: the boundary token first (see ScoreReq)
    token_logprobs: list[list[float]]
    token_ids: list[list[int]]
    token_texts: list[list[str]]
    unconditional_token_logprobs: list[list[float]] | None = None
    meta_info: dict[str, Any] = {}  # prompt_tokens, cached_tokens (summed over choices)


class InfoOut(msgspec.Struct, tag="info_out", kw_only=True):
    rid: str
    info: dict[str, Any]  # model_path, chat_template, context_length, eos/bos, counters, ...


class OkOut(msgspec.Struct, tag="ok", kw_only=True):
    rid: str


class ErrorOut(msgspec.Struct, tag="error", kw_only=True):
    """A request failed; the message names the problem. The runtime keeps serving others."""

    rid: str
    message: str


# Authentication: with an auth token set (required for tcp beyond loopback) the runtime accepts
# only connections that present it as the ZMTP PLAIN password of this user name. Both sides read
# the token from this environment variable when none is passed.
AUTH_USERNAME = "sglite"
AUTH_TOKEN_ENV = "SGLITE_AUTH_TOKEN"

Request = Union[GenerateReq, ScoreReq, AbortReq, FlushCacheReq, InfoReq]
Reply = Union[GenerateOut, ScoreOut, InfoOut, OkOut, ErrorOut]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> Request:
    """Raises msgspec.DecodeError / ValidationError on a malformed message."""
    return _request_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


def parse_sampling_params(raw: dict[str, Any]) -> SamplingParams:
    """Dict from the wire -> SamplingParams; raises ValueError naming an unknown key or bad value."""
    try:
        params = msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid sampling params: {e}") from None
    if params.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {params.max_new_tokens}")
    if params.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {params.min_new_tokens}")
    # SGLang's ranges (sampling_params.py verify); NaN fails every comparison, so each check
    # is written to fail on NaN
    if not (params.temperature >= 0 and math.isfinite(params.temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if not 0 <= params.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {params.min_p}")
    if params.top_k == 0 or params.top_k < -1:
        raise ValueError(f"top_k must be -1 (off) or >= 1, got {params.top_k}")
    if not -2 <= params.frequency_penalty <= 2:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {params.frequency_penalty}")
    if not -2 <= params.presence_penalty <= 2:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {params.presence_penalty}")
    if not 0 < params.repetition_penalty <= 2:
        raise ValueError(f"repetition_penalty must be in (0, 2], got {params.repetition_penalty}")
    for pattern in params.stop_regex:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid stop_regex {pattern!r}: {e}") from None
    if sum(x is not None for x in (params.regex, params.json_schema, params.grammar)) > 1:
        raise ValueError("at most one of regex, json_schema, grammar may be set")
    return params
