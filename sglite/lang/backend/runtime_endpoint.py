"""The sglite runtime as a frontend backend: RuntimeEndpoint attaches to a running runtime by
address; Runtime starts one (sglite.launch.RuntimeProcess) and owns it."""

from __future__ import annotations

from typing import Any, Iterator

from sglite import protocol
from sglite.lang.backend.base import BaseBackend, RuntimeRequestError
from sglite.lang.backend.client import ZmqClient
from sglite.lang.chat_template import (ChatTemplate, chat_template_from_jinja,
                                       get_chat_template)
from sglite.lang.ir import GenParams


class RuntimeEndpoint(BaseBackend):
    """Attach to a runtime at `address`: ZeroMQ ("ipc:///tmp/sglite-x", "tcp://127.0.0.1:30000")
    or an HTTP server ("http://127.0.0.1:30000", `python -m sglite serve --port`), which carries
    the same protocol messages.

    `timeout`: seconds an unanswered ping may wait before waiting programs raise RuntimeDied
    (long, because a busy CPU runtime answers between forward steps)."""

    def __init__(self, address: str, *, chat_template_name: str | None = None,
                 timeout: float = 120.0, _is_alive=None):
        if address.startswith(("http://", "https://")):
            from sglite.lang.backend.http_client import HttpClient

            self.client = HttpClient(address)
        else:
            self.client = ZmqClient(address, is_alive=_is_alive, dead_after=timeout,
                                    ping_interval=min(5.0, timeout / 2))
        self.info = self.get_server_info()
        self.chat_template_name = chat_template_name
        self._chat_template: ChatTemplate | None = None

    @property
    def endpoint(self) -> "RuntimeEndpoint":  # SGLang's Runtime.endpoint
        return self

    def get_model_name(self) -> str:
        return str(self.info.get("model_path"))

    def get_chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            name = self.chat_template_name
            jinja = self.info.get("chat_template")
            if name is not None or not jinja:
                self._chat_template = get_chat_template(name or "default")
            else:
                self._chat_template = chat_template_from_jinja(
                    jinja, eos_token=self.info.get("eos_token") or "",
                    name=str(self.info.get("model_path")))
        return self._chat_template

    def generate(self, prompt=None, sampling_params=None, *, stream: bool = False, **kw):
        """Two callers. The interpreter: generate(text, GenParams, stream=) -> an iterator of
        (delta, meta). A user, as SGLang's `Runtime.generate`: generate(prompt | [prompts] |
        input_ids=..., sampling_params=dict | [dicts], return_logprob=, logprob_start_len=,
        top_logprobs_num=) -> SGLang's /generate response as a JSON string (a dict with text,
        output_ids and meta_info, or a list of them); stream=True yields those dicts instead."""
        if isinstance(sampling_params, GenParams):
            return self._generate_node(prompt, sampling_params, stream=stream)
        import json

        from sglite.engine import GenerateClient

        out = GenerateClient(self.client).generate(prompt, sampling_params, stream=stream, **kw)
        return out if stream else json.dumps(out)

    def _generate_node(self, text: str, params: GenParams, *, stream: bool = False,
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
        req = protocol.GenerateReq(rid=self.client.new_rid("gen"), text=_utf8(text),
                                   stream=stream,
                                   sampling_params=params.to_sampling_params(),
                                   **params.logprob_options())
        q = self.client.request(req)
        finished = False
        try:
            while not finished:
                out = _check(self.client.recv(q))
                finished = out.finished
                yield out.text, out.meta_info
        finally:
            self.client.forget(req.rid)
            if not finished:  # the caller stopped iterating (or failed): free the runtime's slot
                self.client.send(protocol.AbortReq(rid=req.rid))

    def score(self, text: str, choices: list[str], *, unconditional: bool = False,
              ) -> protocol.ScoreOut:
        return _check(self.client.call(protocol.ScoreReq(
            rid=self.client.new_rid("score"), text=_utf8(text),
            choices=[_utf8(c) for c in choices],
            unconditional=unconditional)))

    def cache_prefix(self, text: str) -> None:
        for _ in self.generate(text, GenParams(max_tokens=0)):
            pass

    def flush_cache(self, empty_cache: bool = True) -> None:
        """Empty the radix cache. `empty_cache` (SGLang: also release the allocator's cached
        device memory) is accepted; the runtime's KV pool is allocated once and kept."""
        del empty_cache
        _check(self.client.call(protocol.FlushCacheReq(rid=self.client.new_rid("flush"))))

    def get_server_info(self) -> dict[str, Any]:
        return _check(self.client.call(protocol.InfoReq(rid=self.client.new_rid("info")))).info

    def shutdown(self) -> None:
        self.client.close()


class Runtime(RuntimeEndpoint):
    """Start a runtime process (the embedded SmolLM2-135M-Instruct when model_path is None) and
    use it as a backend; server_args are sglite.runtime.server.args.ServerArgs fields."""

    def __init__(self, model_path: str | None = None, *, chat_template_name: str | None = None,
                 launch_timeout: float = 600.0, **server_args):
        from sglite.launch import RuntimeProcess  # no torch: the runtime runs in a child process

        self.process = RuntimeProcess(model_path, timeout=launch_timeout, **server_args)
        try:
            super().__init__(self.process.address, chat_template_name=chat_template_name,
                             _is_alive=self.process.is_alive)
        except BaseException:
            self.process.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.process.address

    def shutdown(self) -> None:
        super().shutdown()
        self.process.shutdown()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _utf8(text: str) -> str:
    """The wire carries UTF-8: a lone surrogate (e.g. half of an emoji cut from a UTF-16 string)
    fails this program's request with a message that says where, not the encoder deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the prompt holds a lone surrogate {text[e.start]!r} at character "
                         f"{e.start} (...{text[max(0, e.start - 20):e.start]!r}); it cannot be "
                         f"sent as UTF-8") from None
    return text


def _check(msg):
    if isinstance(msg, protocol.ErrorOut):
        raise RuntimeRequestError(msg.message)
    return msg
