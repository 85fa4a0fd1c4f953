"""`sgl.global_config`: SGLang's frontend settings object.

`default_backend` is what `sgl.set_default_backend` sets; `verbosity >= 2` prints each finished
program's text (as SGLang's run does). The other fields exist so that SGLang programs that set
them run unchanged: special tokens are always skipped in output and spaces between them follow the
tokenizer; the runtime's radix cache does what precache-with-tracing and parallel encoding did
(run_batch does not trace programs to precache their prefix: that would run each body twice;
the prefix is cached by the first program that sends it, and `SglFunction.cache()` prefills it)."""

from __future__ import annotations

from typing import Any


class GlobalConfig:
    def __init__(self) -> None:
        self.verbosity = 0
        self.default_backend: Any = None
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True

    def __repr__(self) -> str:
        return f"GlobalConfig({vars(self)})"


global_config = GlobalConfig()
