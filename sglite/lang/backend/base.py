"""What the interpreter needs from a backend. The product backend is RuntimeEndpoint (ZMQ);
`Runtime` is a RuntimeEndpoint that owns its runtime process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator

from sglite import protocol
from sglite.lang.chat_template import ChatTemplate
from sglite.lang.ir import GenParams


class RuntimeRequestError(RuntimeError):
    """The runtime answered a request with ErrorOut; the message names the problem."""


class GraphRun(ABC):
    """A submitted request graph. `wait(node_id)` blocks until that gen/select node finished and
    returns (text, meta_info); it raises RuntimeRequestError once the graph failed. Safe to call
    from several threads (fork branches wait on their own nodes)."""

    @abstractmethod
    def wait(self, node_id: int) -> tuple[str, dict[str, Any]]: ...


class BaseBackend(ABC):
    @abstractmethod
    def get_chat_template(self) -> ChatTemplate: ...

    @abstractmethod
    def generate(self, text: str, params: GenParams, *, stream: bool = False,
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (new text, meta_info) chunks: one when not streaming; the last chunk's meta_info
        is complete (prompt_tokens, completion_tokens, cached_tokens, finish_reason, ...)."""

    @abstractmethod
    def score(self, text: str, choices: list[str], *, unconditional: bool = False,
              ) -> protocol.ScoreOut:
        """Logprobs of each choice as a continuation of text, in one prefill-only request."""

    @abstractmethod
    def run_graph(self, nodes: list[protocol.GraphNode]) -> GraphRun: ...

    @abstractmethod
    def cache_prefix(self, text: str) -> None:
        """Prefill text into the runtime's radix cache (a max_new_tokens=0 request)."""

    @abstractmethod
    def flush_cache(self) -> None: ...

    @abstractmethod
    def get_server_info(self) -> dict[str, Any]: ...

    def shutdown(self) -> None:
        pass
