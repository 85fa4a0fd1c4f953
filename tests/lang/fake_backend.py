"""An in-process backend for unit tests of the interpreter and tracer (no model, no sockets).

Its "generation" is a function of the prompt (`<len:N>` where N is the prompt's length), so two
runs whose prompts differ by even one character show up as different texts. The product backend is RuntimeEndpoint; tests under tests/lang/test_e2e_* use it.
"""

from __future__ import annotations

import threading

from sglite import protocol
from sglite.lang.backend.base import BaseBackend, RuntimeRequestError
from sglite.lang.chat_template import get_chat_template


def fake_generate(prompt: str, sampling_params: dict) -> str:
    if sampling_params.get("regex") == "(":
        raise RuntimeRequestError("invalid regex '(': missing )")
    return f"<len:{len(prompt)}>"


def fake_logprobs(prompt: str, choice: str) -> list[float]:
    # Deterministic: the choice that shares the most characters with the prompt wins.
    return [-0.5] + [-0.1 if ch in prompt else -2.0 for ch in choice]


class FakeBackend(BaseBackend):
    def __init__(self, template: str = "chatml"):
        self.template = get_chat_template(template)
        self.requests: list[tuple[str, str]] = []  # (kind, prompt)
        self.lock = threading.Lock()

    def _log(self, kind: str, prompt: str) -> None:
        with self.lock:
            self.requests.append((kind, prompt))

    def get_chat_template(self):
        return self.template

    def generate(self, text, params, *, stream=False):
        self._log("generate", text)
        out = fake_generate(text, params.to_sampling_params())
        pieces = [out[:3], out[3:]] if stream else [out]
        for i, piece in enumerate(pieces):
            yield piece, ({"prompt_tokens": len(text)} if i == len(pieces) - 1 else {})

    def score(self, text, choices, *, unconditional=False):
        self._log("score", text)
        lps = [fake_logprobs(text, c) for c in choices]
        return protocol.ScoreOut(
            rid="x", token_logprobs=lps, token_ids=[list(range(len(c) + 1)) for c in choices],
            token_texts=[[text[-1:]] + list(c) for c in choices],  # boundary: prefix's last char
            unconditional_token_logprobs=[[0.0] * len(c) for c in choices] if unconditional else None)

    def cache_prefix(self, text):
        self._log("cache_prefix", text)

    def flush_cache(self, empty_cache=True):
        pass

    def get_server_info(self):
        return {"model_path": "fake"}

