"""SGLang's module path for BaseBackend (`from sglang.lang.backend.base_backend import BaseBackend`)."""

from sglite.lang.backend.base import BaseBackend, RuntimeRequestError

__all__ = ["BaseBackend", "RuntimeRequestError"]
