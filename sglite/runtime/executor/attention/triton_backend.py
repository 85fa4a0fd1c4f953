"""Attention through the Triton kernels of sglite.kernels (GPU; the CPU runs them interpreted).

init_forward builds, once per batch, what every layer's kernel call shares: extend start offsets
and the longest extend for EXTEND; for DECODE the KV split count (from batch size, KV heads, SM
count and the longest context) and the fp32 scratch for the split partials. forward stores the
layer's new K/V into its pool buffer and calls the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglite.kernels.decode_attention import decode_attention_fwd
from sglite.kernels.decode_policy import decode_num_splits
from sglite.kernels.extend_attention import extend_attention_fwd
from sglite.kernels.store_kv import store_kv
from sglite.runtime.executor.attention.base import AttentionLayer, BaseAttentionBackend, ForwardBatch


@dataclass
class _ExtendMeta:
    extend_start_loc: torch.Tensor  # [bs] int32, first new token of each request in the packed axis
    max_extend_len: int


@dataclass
class _DecodeMeta:
    num_splits: int  # for full-attention layers; windowed layers use at most this many
    max_seq_len: int
    mid_o: torch.Tensor  # [bs, H, num_splits, D] fp32, split partials shared by all layers
    mid_lse: torch.Tensor  # [bs, H, num_splits] fp32
    window_splits: dict[tuple[int, int], int] = field(default_factory=dict)  # (W, G) -> splits


class TritonAttentionBackend(BaseAttentionBackend):
    supports_cuda_graph = True

    def __init__(self, *, kv_cache, model_config, device):
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.num_heads = model_config.num_heads
        self.num_kv_heads = model_config.num_kv_heads
        self.head_dim = model_config.head_dim
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            self.num_sms = 4  # interpreter: a few splits are enough to exercise the merge
        self._meta: _ExtendMeta | _DecodeMeta | None = None
        self._graph_context_len = 0
        self._graph_mid_o: torch.Tensor | None = None  # flat fp32 scratch shared by all graphs
        self._graph_mid_lse: torch.Tensor | None = None

    def init_forward(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            self._meta = self._decode_meta(batch)
        else:
            # exclusive prefix sum on the device: no host-to-device copy
            starts = (batch.extend_lens.cumsum(0) - batch.extend_lens).to(torch.int32)
            self._meta = _ExtendMeta(starts, max(batch.extend_lens_cpu))

    def init_cuda_graph_state(self, batch_sizes: list[int], *, max_context_len: int) -> None:
        """Scratch for captured decode forwards, sized for the largest bs x splits of any captured
        size. All graphs share it: they replay one at a time on one stream."""
        self._graph_context_len = max_context_len
        rows = max(bs * self._graph_splits(bs) for bs in batch_sizes)  # (request, split) pairs
        kw = dict(dtype=torch.float32, device=self.device)
        self._graph_mid_o = torch.empty(rows * self.num_heads * self.head_dim, **kw)
        self._graph_mid_lse = torch.empty(rows * self.num_heads, **kw)

    def init_forward_capture(self, batch: ForwardBatch) -> None:
        """init_forward for a decode batch about to be captured: static scratch, and splits that
        hold for any lengths up to the context limit."""
        assert batch.is_decode and self._graph_mid_o is not None, "init_cuda_graph_state first"
        bs, heads, dim = batch.batch_size, self.num_heads, self.head_dim
        splits = self._graph_splits(bs)
        mid_o = self._graph_mid_o[: bs * heads * splits * dim].view(bs, heads, splits, dim)
        mid_lse = self._graph_mid_lse[: bs * heads * splits].view(bs, heads, splits)
        self._meta = _DecodeMeta(splits, self._graph_context_len, mid_o, mid_lse)

    def kv_destination(self, layer: AttentionLayer, batch: ForwardBatch):
        if self.kv_cache.is_fp8:  # the rotary kernel stores unquantized; store_kv quantizes
            return None
        return (*self.kv_cache.get_kv(layer.kv_layer_id), batch.out_cache_loc)

    def forward(self, q, k, v, layer: AttentionLayer, batch: ForwardBatch, *,
                kv_stored: bool = False, prefetch_kv: bool = False) -> torch.Tensor:
        k_buf, v_buf = self.kv_cache.get_kv(layer.kv_layer_id)
        k_scale, v_scale = self.kv_cache.get_scales(layer.kv_layer_id)
        # an FP8 pool is read by the kernels as it is; q and the new tokens' K/V stay unquantized
        dtype = q.dtype if self.kv_cache.is_fp8 else k_buf.dtype
        if k is not None:
            k, v = k.to(dtype), v.to(dtype)
            if not kv_stored:
                store_kv(k_buf, v_buf, batch.out_cache_loc, k, v, k_scale=k_scale, v_scale=v_scale)
        q = q.to(dtype)
        out = torch.empty_like(q)
        window = dict(sliding_window=layer.sliding_window, global_tokens=layer.global_tokens,
                      logit_cap=layer.logit_softcap, k_scale=k_scale, v_scale=v_scale)
        meta = self._meta
        if batch.is_decode:
            assert isinstance(meta, _DecodeMeta), "init_forward was not called for this decode batch"
            decode_attention_fwd(
                q, k_buf, v_buf, out, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                scale=layer.scale, num_splits=self._num_splits(meta, layer), mid_o=meta.mid_o,
                mid_lse=meta.mid_lse, page_size=self.kv_cache.page_size, early_tile=prefetch_kv,
                **window,
            )
        else:
            assert isinstance(meta, _ExtendMeta), "init_forward was not called for this extend batch"
            extend_attention_fwd(
                q, k, v, out, k_buf, v_buf, batch.req_to_token, batch.req_pool_indices,
                batch.prefix_lens, batch.extend_lens, meta.extend_start_loc,
                max_extend_len=meta.max_extend_len, scale=layer.scale,
                out_cache_loc=batch.out_cache_loc, **window,
            )
        return out

    def _decode_meta(self, batch: ForwardBatch) -> _DecodeMeta:
        bs = batch.batch_size
        splits = decode_num_splits(bs, self.num_kv_heads, num_sms=self.num_sms,
                                   max_kv_len=max(batch.seq_lens_cpu))
        mid_o = torch.empty(bs, self.num_heads, splits, self.head_dim, dtype=torch.float32, device=self.device)
        mid_lse = torch.empty(bs, self.num_heads, splits, dtype=torch.float32, device=self.device)
        return _DecodeMeta(splits, max(batch.seq_lens_cpu), mid_o, mid_lse)

    def _graph_splits(self, bs: int) -> int:
        return decode_num_splits(bs, self.num_kv_heads, num_sms=self.num_sms,
                                 max_kv_len=self._graph_context_len)

    def _num_splits(self, meta: _DecodeMeta, layer: AttentionLayer) -> int:
        """A windowed layer reads at most W + G keys per request: split only those."""
        if layer.sliding_window is None:
            return meta.num_splits
        key = (layer.sliding_window, layer.global_tokens)
        if key not in meta.window_splits:
            visible = min(meta.max_seq_len, layer.sliding_window + layer.global_tokens)
            bs = meta.mid_o.shape[0]
            splits = decode_num_splits(bs, self.num_kv_heads, num_sms=self.num_sms, max_kv_len=visible)
            meta.window_splits[key] = min(splits, meta.num_splits)
        return meta.window_splits[key]
