"""Plain torch attention over the KV pool: the CPU backend and the reference for the kernels.

Extend: one SDPA call per request (its new tokens against [0, seq_len) of its KV).
Decode: one SDPA call for the whole batch, KV gathered into [bs, kv_heads, max_len, head_dim]
and padded positions masked out. Masks are built only when causality alone does not suffice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglite.runtime.executor.attention.base import AttentionLayer, BaseAttentionBackend, ForwardBatch
from sglite.runtime.mem.kv_cache import KVCache


class TorchAttentionBackend(BaseAttentionBackend):
    def __init__(self, *, kv_cache: KVCache, model_config=None, device="cpu"):
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self._batch: ForwardBatch | None = None
        self._kv_indices: list[torch.Tensor] | torch.Tensor = []
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def init_forward(self, batch: ForwardBatch) -> None:
        self._batch = batch
        self._masks = {}  # per (window, globals): layers with the same pattern share one mask
        rows = batch.req_pool_indices
        if batch.is_decode:
            max_len = max(batch.seq_lens_cpu)
            self._kv_indices = batch.req_to_token[rows, :max_len].long()  # [bs, max_len]
        else:
            self._kv_indices = [
                batch.req_to_token[row, :seq_len].long()
                for row, seq_len in zip(rows.tolist(), batch.seq_lens_cpu)
            ]

    def forward(self, q, k, v, layer: AttentionLayer, batch: ForwardBatch, *,
                kv_stored: bool = False, prefetch_kv: bool = False) -> torch.Tensor:  # prefetch_kv: no use here
        if k is not None and not kv_stored:
            self.kv_cache.store(layer.kv_layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.kv_cache.get_kv(layer.kv_layer_id)
        if batch.is_decode:
            return self._decode(q, k_buf, v_buf, layer, batch)
        return self._extend(q, k_buf, v_buf, layer, batch)

    def _decode(self, q, k_buf, v_buf, layer, batch):
        idx = self._kv_indices  # [bs, max_len]
        keys, values = self._gather(layer, idx, q, k_buf)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [bs, Hkv, max_len, D]
        mask = self._mask(layer, batch, None)  # [bs, 1, 1, max_len] or None
        if layer.logit_softcap is not None:
            if mask is None:
                mask = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool, device=keys.device)
            return _softcap_attention(q.unsqueeze(2), keys, values, mask, layer).squeeze(2).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(keys.dtype), keys, values, attn_mask=mask, scale=layer.scale,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )  # [bs, H, 1, D]
        return o.squeeze(2).to(q.dtype)

    def _extend(self, q, k_buf, v_buf, layer, batch):
        out = torch.empty_like(q)
        start = 0
        for i, extend_len in enumerate(batch.extend_lens_cpu):
            idx = self._kv_indices[i]
            seq_len = batch.seq_lens_cpu[i]
            q_i = q[start : start + extend_len].transpose(0, 1)  # [H, e, D]
            keys, values = self._gather(layer, idx, q, k_buf)
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [Hkv, seq_len, D]
            mask = self._mask(layer, batch, i)
            is_causal = mask is None and extend_len > 1
            if layer.logit_softcap is not None:
                if mask is None:
                    mask = visible(torch.arange(seq_len - extend_len, seq_len, device=keys.device)[:, None],
                                   torch.arange(seq_len, device=keys.device)[None, :], None, 0)
                o = _softcap_attention(q_i[None], keys[None], values[None], mask, layer)[0]
                out[start : start + extend_len] = o.transpose(0, 1).to(q.dtype)
                start += extend_len
                continue
            # 4-D inputs: on CPU, 3-D ones fall back to SDPA's math path (2x slower at 512 tokens)
            o = F.scaled_dot_product_attention(
                q_i.to(keys.dtype)[None], keys[None], values[None], attn_mask=mask,
                is_causal=is_causal, scale=layer.scale,
                enable_gqa=layer.num_heads != layer.num_kv_heads,
            )[0]
            out[start : start + extend_len] = o.transpose(0, 1).to(q.dtype)
            start += extend_len
        return out

    def _gather(self, layer: AttentionLayer, idx, q, k_buf):
        """K, V at slots idx: in the pool's dtype, or an FP8 pool's dequantized to q's."""
        return self.kv_cache.gather(layer.kv_layer_id, idx, q.dtype if self.kv_cache.is_fp8 else k_buf.dtype)

    def _mask(self, layer: AttentionLayer, batch: ForwardBatch, req: int | None):
        """Boolean "may attend" mask, or None where SDPA's own causal flag is exact."""
        key = (layer.sliding_window, layer.global_tokens, req)
        if key not in self._masks:
            self._masks[key] = _build_mask(layer, batch, req, self.device)
        return self._masks[key]


def _build_mask(layer: AttentionLayer, batch: ForwardBatch, req: int | None, device):
    window, num_global = layer.sliding_window, layer.global_tokens
    if req is None:  # decode: query at seq_len - 1 against padded keys
        seq_lens = batch.seq_lens.to(device=device, dtype=torch.int64)  # [bs]
        needs_mask = window is not None or len(set(batch.seq_lens_cpu)) > 1
        if not needs_mask:
            return None
        q_pos = (seq_lens - 1)[:, None]  # [bs, 1]
        k_pos = torch.arange(max(batch.seq_lens_cpu), device=device)[None, :]
        return visible(q_pos, k_pos, window, num_global)[:, None, None, :]
    prefix_len, seq_len = batch.prefix_lens_cpu[req], batch.seq_lens_cpu[req]
    if window is None and prefix_len == 0:
        return None  # plain causal: SDPA's is_causal is exact (top-left aligned, no prefix)
    if window is None and seq_len - prefix_len == 1:
        return None  # one query at the end sees everything
    q_pos = torch.arange(prefix_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    return visible(q_pos, k_pos, window, num_global)


def visible(q_pos, k_pos, window: int | None, num_global: int) -> torch.Tensor:
    """May a query at q_pos see a key at k_pos? Causal, within the window, or a global token."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((k_pos > q_pos - window) | (k_pos < num_global))
    return allowed


def _softcap_attention(q, keys, values, mask, layer: AttentionLayer):
    """SDPA with soft-capped scores (which SDPA cannot do), as transformers' eager Gemma 2:
    q [B, H, nq, D], keys/values [B, Hkv, nk, D], mask bool broadcastable to [B, H, nq, nk]."""
    group = layer.num_heads // layer.num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    cap = layer.logit_softcap
    scores = torch.matmul(q.to(keys.dtype), keys.transpose(-1, -2)) * layer.scale
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values)
