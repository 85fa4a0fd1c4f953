"""Triton kernels over the paged KV pool, each with a plain-torch reference (reference.py).

Imports nothing of sglite. Modules: extend_attention (prefill against a cached prefix + causal
self-attention), decode_attention (flash-decoding with split KV), store_kv (scatter new K/V into
the pool). On a CPU they run under TRITON_INTERPRET=1, set before these modules are imported.
"""
