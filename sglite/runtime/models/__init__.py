"""Model families: config, loading (safetensors, GGUF), shared layers, one module per family.

Imports nothing at package level, so that the KV pool can read `models.config` without the model code."""
