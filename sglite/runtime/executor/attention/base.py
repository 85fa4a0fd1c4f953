"""The attention backend interface and the batch metadata every backend reads.

A forward runs one `ForwardBatch`: either EXTEND (each request appends `extend_len >= 1` new tokens
on top of `prefix_len` tokens whose KV is already in the pool) or DECODE (each request appends one
token). New tokens of all requests are packed along one token axis, request by request.

KV lives in a token-granular pool: `req_to_token[req_pool_idx, pos]` is the KV slot of position
`pos` of that request. Slot 0 is reserved as the padding target. Before the forward, the caller has
allocated slots for the new tokens and written them into `req_to_token`; `out_cache_loc` holds the
same slots in token order, so a backend can store K/V with one scatter.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


# The LM head's rows are padded to a multiple of this on CUDA (the last row repeated): cuBLAS holds
# the launch of a GEMM at a shape it has not run before in the process until the GPU has drained
# (H200, torch 2.11: 27-32 ms behind 30 ms of queued work, 0.05 ms the second time), which would
# stall the host behind every forward whose logit rows are a new count; padded, the counts are few
# and the scheduler's warm-up runs each of them once (warmup.py).
LOGIT_ROW_BUCKET = 64


def pad_logit_rows(rows: list[int], device: torch.device) -> list[int]:
    """rows padded with copies of the last to a multiple of LOGIT_ROW_BUCKET on CUDA; elsewhere
    returned as they are (a CPU forward pays for every padded row and has no such stall)."""
    if device.type != "cuda" or not rows:
        return rows
    return rows + rows[-1:] * (-len(rows) % LOGIT_ROW_BUCKET)


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, position of each new token in its request
    req_pool_indices: torch.Tensor  # [bs] int64, rows of req_to_token
    seq_lens: torch.Tensor  # [bs] int32, prefix_len + extend_len
    prefix_lens: torch.Tensor  # [bs] int32, tokens already in the pool before this forward
    extend_lens: torch.Tensor  # [bs] int32, new tokens per request (1 for decode)
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slots of the new tokens
    req_to_token: torch.Tensor  # [max_reqs, max_context] int32 (the whole table)
    # host copies of the lengths (python ints) so that backends need no device sync
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    # which logits to compute: False -> last new token of each request; True -> every new token
    return_all_logits: bool = False
    # or exactly these packed token rows [num_logit_rows] int64 (input logprobs: only the rows
    # that score a wanted token, plus each request's last); overrides return_all_logits. On CUDA
    # padded by pad_logit_rows: the logits' first num_logit_rows rows are the real ones
    logit_rows: torch.Tensor | None = None
    num_logit_rows: int | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE


@dataclass(frozen=True)
class AttentionLayer:
    """Static per-layer attention facts (built once by the model)."""

    layer_id: int
    kv_layer_id: int  # index of the KV buffer this layer reads (CLA: several layers share one)
    produces_kv: bool  # False for CLA layers that reuse the KV of an earlier layer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None  # W: a query at p sees keys p-W < j <= p ...
    global_tokens: int = 0  # ... plus keys j < G (attention sinks)
    logit_softcap: float | None = None  # Gemma 2: scores s -> cap * tanh(s / cap) before softmax


class BaseAttentionBackend(ABC):
    """Computes attention for one layer of a ForwardBatch over the paged KV pool."""

    @abstractmethod
    def init_forward(self, batch: ForwardBatch) -> None:
        """Called once per forward before the first layer: build per-batch metadata
        (indices, split sizes). Must not modify the KV pool."""

    def kv_destination(self, layer: AttentionLayer, batch: ForwardBatch):
        """(k_buffer, v_buffer, slots) where layer's new K/V belong, for a model that stores
        them in the launch that computes them (the fused rotary kernel), then passes
        kv_stored=True to forward; None (the default): forward stores them."""
        return None

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None if not produces_kv
        v: torch.Tensor | None,
        layer: AttentionLayer,
        batch: ForwardBatch,
        *,
        kv_stored: bool = False,
        prefetch_kv: bool = False,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store k/v at batch.out_cache_loc into buffer layer.kv_layer_id (if given and not
        kv_stored already), then attend each new token to positions [0, its position] of its
        request (causal), masked by the layer's sliding window and global tokens; scores
        soft-capped where layer.logit_softcap is set. prefetch_kv (a hint): the kernel that
        stored k/v is long and lets the next one launch early (Gemma's one-row qkv GEMV), so
        decode may load the pool's earlier rows while it runs."""
