"""sglite: a structured-generation runtime for LLM programs. `import sglite as sgl` reads like
SGLang's frontend: @sgl.function, sgl.gen, sgl.select, roles, sgl.Runtime, sgl.RuntimeEndpoint."""

from sglite.choices import (greedy_token_selection, token_length_normalized,
                            unconditional_likelihood_normalized)
from sglite.lang.api import (assistant, assistant_begin, assistant_end, flush_cache, function, gen,
                             gen_int, gen_string, get_server_info, image, select,
                             separate_reasoning, set_default_backend, system, system_begin,
                             system_end, user, user_begin, user_end, video)
from sglite.lang.backend.client import RuntimeDied
from sglite.lang.backend.base import BaseBackend, RuntimeRequestError
from sglite.lang.global_config import global_config
from sglite.lang.backend.runtime_endpoint import Runtime, RuntimeEndpoint
from sglite.lang.state import ProgramState, ProgramStateGroup

__version__ = "0.1.0"


def __getattr__(name: str):
    # sgl.Engine (the offline engine) is imported on first use, so `import sglite` stays light.
    if name == "Engine":
        from sglite.engine import Engine

        return Engine
    raise AttributeError(f"module 'sglite' has no attribute {name!r}")


__all__ = [
    "function", "gen", "gen_int", "gen_string", "select", "image", "video", "separate_reasoning",
    "system", "user", "assistant", "global_config", "BaseBackend",
    "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end",
    "set_default_backend", "flush_cache", "get_server_info", "Runtime", "RuntimeEndpoint", "Engine",
    "ProgramState", "ProgramStateGroup", "RuntimeDied", "RuntimeRequestError",
    "token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized",
]
