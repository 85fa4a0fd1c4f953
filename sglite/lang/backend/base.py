"""What the interpreter needs from a backend. The product backend is RuntimeEndpoint (ZMQ);
`Runtime` is a RuntimeEndpoint that owns its runtime process.

BaseBackend can be instantiated, as SGLang's can: `trace()` / `compile().print_graph()` only need
its chat template (`backend.chat_template = get_chat_template("llama-2-chat")`)."""

from __future__ import annotations

from typing import Any, Iterator

from sglite import protocol
from sglite.lang.chat_template import ChatTemplate, get_chat_template
from sglite.lang.ir import GenParams


class RuntimeRequestError(RuntimeError):
    """The runtime answered a request with ErrorOut; the message names the problem."""


class BaseBackend:
    def __init__(self) -> None:
        self.chat_template = get_chat_template("default")

    def get_model_name(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} serves no model")

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def generate(self, text: str, params: GenParams, *, stream: bool = False,
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (new text, meta_info) chunks: one when not streaming; the last chunk's meta_info
        is complete (prompt_tokens, completion_tokens, cached_tokens, finish_reason, ...)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate")

    def score(self, text: str, choices: list[str], *, unconditional: bool = False,
              ) -> protocol.ScoreOut:
        """Logprobs of each choice as a continuation of text, in one prefill-only request."""
        raise NotImplementedError(f"{type(self).__name__} cannot score choices")

    def cache_prefix(self, text: str) -> None:
        """Prefill text into the runtime's radix cache (a max_new_tokens=0 request)."""

    def flush_cache(self, empty_cache: bool = True) -> None:
        pass

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass
