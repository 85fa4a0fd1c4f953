"""sglite.lang: the SGLang-style frontend. Imports neither torch nor sglite.runtime; it talks to
the runtime over ZeroMQ with sglite.protocol."""
