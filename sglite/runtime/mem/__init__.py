"""KV memory: request table, slot pool, per-layer KV buffers, radix prefix cache."""
