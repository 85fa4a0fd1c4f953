"""ModelRunner: owns the model, the KV pool and the attention backend; turns request-level
lengths into a ForwardBatch and runs it. The scheduler allocates slots; the runner only writes
them into req_to_token and computes.

CUDA graphs: on a GPU with a backend that supports them (triton), decode batches of up to
`cuda_graph_max_bs` requests replay graphs captured at start-up (sglite.runtime.executor.cuda_graph);
`forward` routes them there and runs everything else eagerly through `_run_model(batch)`.
"""

from __future__ import annotations

import itertools
import logging
import os

import torch

from sglite.kernels.decode_batch import stage_decode_batch, unpack_decode_batch_new
from sglite.runtime.executor.attention import ForwardBatch, ForwardMode, create_attention_backend
from sglite.runtime.executor.attention.base import pad_logit_rows
from sglite.runtime.models.config import ModelConfig
from sglite.runtime.mem.kv_cache import KVCache, bytes_per_token, mha_bytes_per_token, resolve_kv_dtype
from sglite.runtime.mem.req_to_token import ReqToToken
from sglite.runtime.mem.token_pool import PagedTokenPool, TokenPool
from sglite.runtime.models.registry import get_model_class
from sglite.runtime.executor.transfer import to_device_async

logger = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_CPU_KV_BYTES = 512 << 20  # default KV budget on CPU
_GPU_KV_FRACTION = 0.85  # of the memory free after loading the weights


class ModelRunner:
    def __init__(
        self,
        model_path: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        attention_backend: str = "auto",
        load_format: str = "auto",
        preset: str | None = None,
        max_total_tokens: int | None = None,
        kv_memory_bytes: int | None = None,
        max_running_requests: int = 256,
        max_context_len: int | None = None,
        page_size: int = 1,  # > 1: a paged KV pool (mem/token_pool.py), the GPU server's default
        config_overrides: dict | None = None,
        seed: int = 0,
        skip_tokenizer_init: bool = False,  # weights-only folders (tests, benchmarks)
        disable_cuda_graph: bool = False,
        cuda_graph_max_bs: int | None = None,  # None: max_running_requests, at most 512
        quantization: str | None = None,  # "fp8"; None: the checkpoint's own (quantization_config)
        kv_cache_dtype: str = "auto",  # "auto" (the model's dtype) | "fp8_e4m3"
        tp_size: int = 1,  # tensor parallelism: rank 0 spawns ranks 1..tp_size-1 (sglite.runtime.distributed)
        tp_rank: int = 0,
    ):
        init_args = {k: v for k, v in locals().items() if k != "self"}  # what the other ranks build
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.model_path, self.tokenizer = None, None
        self.model_config = self._load_config(
            model_path, load_format, preset, config_overrides or {}, skip_tokenizer_init
        )
        self.kv_dtype = resolve_kv_dtype(kv_cache_dtype, self.dtype)
        if tp_size > 1 and quantization is not None:
            # the tp shards slice weights after loading; FP8 layers' scales are not sliced yet
            raise ValueError("quantization with tp_size > 1 is not supported yet")
        self.model = self._load_model(load_format, seed, quantization)
        self.tp = None
        if tp_size > 1:  # shard the model; model_config becomes this rank's view (its heads)
            from sglite.runtime.distributed import start_tensor_parallel

            self.tp = start_tensor_parallel(self, init_args)
        self.kv_cache = self._make_kv_cache(max_total_tokens, kv_memory_bytes)
        self.token_pool = (TokenPool(self.kv_cache.capacity) if page_size == 1
                           else PagedTokenPool(self.kv_cache.capacity, page_size))
        self.kv_cache.page_size = page_size
        if max_context_len is None:
            max_context_len = self.model_config.max_position_embeddings
            if not self.model_config.is_all_windowed:  # no request outgrows the pool
                max_context_len = min(max_context_len, self.kv_cache.capacity)
        self.max_context_len = max_context_len
        self.req_to_token = ReqToToken(max_running_requests, max_context_len, device=self.device)
        self.attn_backend = create_attention_backend(
            attention_backend, kv_cache=self.kv_cache, model_config=self.model_config,
            device=self.device,
        )
        self._log_kv_economy()
        self.graph_runner = None
        if self.device.type == "cuda" and not disable_cuda_graph:
            if getattr(self.attn_backend, "supports_cuda_graph", False):
                from sglite.runtime.executor.cuda_graph import MAX_CAPTURE_BS, CudaGraphRunner

                max_bs = cuda_graph_max_bs or min(max_running_requests, MAX_CAPTURE_BS)
                self.graph_runner = CudaGraphRunner(self, max_bs=max_bs)
            else:
                logger.info("attention backend %r has no CUDA graph support: decode runs eagerly",
                            attention_backend)

    # --- batches ---------------------------------------------------------------------------
    def make_extend_batch(
        self,
        req_pool_indices: list[int],
        prefix_lens: list[int],
        new_token_ids: list[list[int]],
        out_cache_loc: torch.Tensor,  # [num_new_tokens] int64 slots, request by request
        *,
        return_all_logits: bool = False,
        logits_from: list[int] | None = None,
    ) -> ForwardBatch:
        """logits_from: per request, the first new-token offset whose logits are wanted (the rest
        of its new tokens too); None: the last new token of each (or all: return_all_logits)."""
        extend_lens = [len(ids) for ids in new_token_ids]
        if min(extend_lens, default=0) < 1:
            raise ValueError("every request of an extend batch needs at least one new token")
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        positions = [torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)]
        input_ids = [t for ids in new_token_ids for t in ids]
        batch = self._make_batch(
            ForwardMode.EXTEND, req_pool_indices, prefix_lens, extend_lens, input_ids,
            torch.cat(positions), out_cache_loc, return_all_logits,
        )
        if logits_from is not None:
            starts = [0, *itertools.accumulate(extend_lens)][:-1]
            rows = [s + r for s, first, n in zip(starts, logits_from, extend_lens) for r in range(first, n)]
            batch.num_logit_rows = len(rows)
            rows = pad_logit_rows(rows, self.device)
            batch.logit_rows = to_device_async(torch.tensor(rows, dtype=torch.int64), self.device)
        return batch

    def make_decode_batch(
        self,
        req_pool_indices: list[int],
        seq_lens: list[int],  # including the new token
        last_token_ids: list[int],  # placeholders where the ids are fed from the device
        out_cache_loc: torch.Tensor,  # [bs] int64, the slot of each new token
        *,
        fed_ids: torch.Tensor | None = None,
        fed_index: list[int] | None = None,
    ) -> ForwardBatch:
        """An eager decode batch, staged as the CUDA graphs stage theirs (one host block, one
        host-to-device copy, then the unpack that also writes the slots into req_to_token); fed_ids
        and fed_index as in forward_decode."""
        self._check_decode(req_pool_indices, seq_lens, last_token_ids, out_cache_loc)
        self._mirror_decode(req_pool_indices, seq_lens, out_cache_loc)
        self.req_to_token.flush()
        return self._decode_batch(req_pool_indices, seq_lens, last_token_ids, out_cache_loc,
                                  fed_ids=fed_ids, fed_index=fed_index)

    def _decode_batch(self, req_pool_indices, seq_lens, last_token_ids, out_cache_loc, *,
                      fed_ids=None, fed_index=None) -> ForwardBatch:
        bs = len(seq_lens)
        host = stage_decode_batch(last_token_ids, seq_lens, req_pool_indices, out_cache_loc, num_rows=bs,
                                  num_fed=0 if fed_ids is None else len(fed_ids), fed_index=fed_index)
        staged = to_device_async(host, self.device)
        t = unpack_decode_batch_new(staged, fed_ids, self.req_to_token.table)
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=t["input_ids"], positions=t["positions"],
            req_pool_indices=t["rows"], seq_lens=t["seq_lens"], prefix_lens=t["prefix_lens"],
            extend_lens=torch.ones(bs, dtype=torch.int32, device=self.device),
            out_cache_loc=t["out_cache_loc"], req_to_token=self.req_to_token.table,
            seq_lens_cpu=list(seq_lens), prefix_lens_cpu=[s - 1 for s in seq_lens], extend_lens_cpu=[1] * bs,
        )

    def forward_decode(
        self,
        req_pool_indices: list[int],
        seq_lens: list[int],  # including the new token
        last_token_ids: list[int],  # placeholders where the ids are fed from the device
        out_cache_loc: torch.Tensor,  # [bs] int64, the slot of each new token
        *,
        fed_ids: torch.Tensor | None = None,
        fed_index: list[int] | None = None,
        use_cuda_graph: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step, which also writes the new slots into req_to_token. fed_ids: tokens
        still on the device (sampled by the previous step, not read back): the first k requests'
        input ids are fed_ids[fed_index] (k = len(fed_index)), or fed_ids itself (k = its length)
        without an index. Returns (logits float32 [bs, vocab], the input ids on the device [bs]);
        from a CUDA graph both are views that the next forward overwrites."""
        bs = self._check_decode(req_pool_indices, seq_lens, last_token_ids, out_cache_loc)
        self._mirror_decode(req_pool_indices, seq_lens, out_cache_loc)
        self.req_to_token.flush()  # the scheduler's writes (prefix hits), before the graph reads
        graphs = self.graph_runner
        if (use_cuda_graph and graphs is not None and bs <= graphs.max_bs
                and (fed_ids is None or len(fed_ids) <= graphs.max_bs)):
            with torch.inference_mode():
                return graphs.replay_decode(req_pool_indices, seq_lens, last_token_ids,
                                            out_cache_loc, fed_ids=fed_ids, fed_index=fed_index)
        batch = self._decode_batch(req_pool_indices, seq_lens, last_token_ids, out_cache_loc,
                                   fed_ids=fed_ids, fed_index=fed_index)
        return self.forward(batch, use_cuda_graph=False), batch.input_ids

    def _mirror_decode(self, req_pool_indices, seq_lens, out_cache_loc) -> None:
        """The host mirror of the slots a decode writes on the device (position seq_len - 1)."""
        self.req_to_token.mirror(torch.tensor(req_pool_indices), torch.tensor(seq_lens) - 1,
                                 out_cache_loc)

    def _check_decode(self, req_pool_indices, seq_lens, last_token_ids, out_cache_loc) -> int:
        bs = len(seq_lens)
        if not len(req_pool_indices) == len(last_token_ids) == len(out_cache_loc) == bs:
            raise ValueError(f"decode batch of {bs} lengths got {len(req_pool_indices)} rows, "
                             f"{len(last_token_ids)} tokens, {len(out_cache_loc)} slots")
        if bs == 0 or min(seq_lens) < 1 or max(seq_lens) > self.max_context_len:
            raise ValueError(f"decode lengths must be in [1, max_context_len={self.max_context_len}], got "
                             f"{min(seq_lens, default=None)}..{max(seq_lens, default=None)}")
        return bs

    def forward(self, batch: ForwardBatch, *, use_cuda_graph: bool = True) -> torch.Tensor:
        """Logits float32 [bs, vocab], or [num_tokens, vocab] if batch.return_all_logits.
        From a CUDA graph the logits are a view that the next forward overwrites."""
        self.req_to_token.flush()  # the scheduler's writes since the batch was made
        with torch.inference_mode():
            graphs = self.graph_runner
            if use_cuda_graph and graphs is not None and graphs.can_run(batch):
                return graphs.replay(batch)
            self.attn_backend.init_forward(batch)
            return self._run_model(batch)

    def _run_model(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch, self.attn_backend)

    def _make_batch(self, mode, rows, prefix_lens, extend_lens, input_ids, positions,
                    out_cache_loc, return_all_logits) -> ForwardBatch:
        if len(out_cache_loc) != len(input_ids):
            raise ValueError(f"out_cache_loc has {len(out_cache_loc)} slots for {len(input_ids)} tokens")
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        if max(seq_lens, default=0) > self.max_context_len:
            raise ValueError(f"position {max(seq_lens) - 1} exceeds "
                             f"max_context_len={self.max_context_len}")
        # one host-to-device copy for every per-token and per-request int (as make_decode_batch),
        # and one index_put for all rows (per-row writes cost a host-to-device copy each on a GPU)
        num_tokens, bs = len(input_ids), len(rows)
        token_rows = torch.tensor(rows, dtype=torch.int64).repeat_interleave(
            torch.tensor(extend_lens, dtype=torch.int64))
        per_token = _aligned_rows([torch.tensor(input_ids, dtype=torch.int64).view(1, -1),
                                   positions.to(torch.int64).view(1, -1), token_rows.view(1, -1),
                                   out_cache_loc.to(torch.int64).view(1, -1)], num_tokens)
        self.req_to_token.flush()  # the scheduler's writes first: the scatter below is newer
        self.req_to_token.mirror(token_rows, positions, out_cache_loc)  # the device write below
        host = torch.cat([per_token, _aligned_rows([torch.tensor(
            [rows, seq_lens, prefix_lens, extend_lens], dtype=torch.int64)], bs)])
        packed = to_device_async(host, self.device)
        ids, positions, token_rows, out_cache_loc = _row_views(packed, 0, 4, num_tokens)
        per_req = _row_views(packed, per_token.numel(), 4, bs, padded=True)
        lens32 = per_req[1:].to(torch.int32)[:, :bs]  # seq_lens, prefix_lens, extend_lens (aligned rows)
        per_req = per_req[:, :bs]
        self.req_to_token.table[token_rows, positions] = out_cache_loc.to(torch.int32)
        return ForwardBatch(
            mode=mode,
            input_ids=ids,
            positions=positions,
            req_pool_indices=per_req[0],
            seq_lens=lens32[0],
            prefix_lens=lens32[1],
            extend_lens=lens32[2],
            out_cache_loc=out_cache_loc,
            req_to_token=self.req_to_token.table,
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=list(prefix_lens),
            extend_lens_cpu=extend_lens,
            return_all_logits=return_all_logits,
        )

    # --- start-up --------------------------------------------------------------------------
    def _load_config(self, model_path, load_format, preset, overrides, skip_tokenizer) -> ModelConfig:
        from sglite.runtime.models.loader import load_config, load_tokenizer, resolve_model

        if load_format not in ("auto", "dummy"):
            raise ValueError(f"unknown load_format {load_format!r} (auto or dummy)")
        if load_format == "dummy" and model_path is None:
            return ModelConfig.from_preset(preset or "tiny", **overrides)
        if load_format == "dummy" and preset is not None:
            raise ValueError("give either a model path or a preset for dummy weights, not both")
        self.model_path = resolve_model(model_path, need_weights=load_format != "dummy")
        # dummy weights keep the folder's tokenizer when it has one (vLLM's meaning): text
        # programs then run at a real model's shape from a config-only folder
        if not skip_tokenizer and (load_format == "auto" or _has_tokenizer(self.model_path)):
            self.tokenizer = load_tokenizer(self.model_path)
        return load_config(self.model_path, **overrides)

    def _load_model(self, load_format: str, seed: int, quantization: str | None) -> torch.nn.Module:
        from sglite.runtime.models import quant
        from sglite.runtime.models.loader import iter_weights

        published = quant.checkpoint_quantization(self.model_path) if load_format != "dummy" else None
        self.quantization = quant.resolve_quantization(quantization, published)
        with torch.device("meta"):  # no time spent on an init the weights overwrite
            model = get_model_class(self.model_config.architecture)(self.model_config)
        model = model.to(self.dtype).to_empty(device=self.device)
        weights = None
        if load_format == "dummy":
            model.init_dummy_weights(seed)
        else:
            weights = iter_weights(self.model_path)
        if self.quantization is not None:
            quant.load_quantized(model, weights, method=self.quantization, checkpoint_config=published)
        elif weights is not None:
            model.load_weights(weights)
        return model.eval()

    def _make_kv_cache(self, max_total_tokens, kv_memory_bytes) -> KVCache:
        if max_total_tokens is None and kv_memory_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_memory_bytes = int(free * _GPU_KV_FRACTION)
            else:
                kv_memory_bytes = _CPU_KV_BYTES
        if self.tp is not None:  # the same slots on every rank (their heads may differ)
            max_total_tokens = self.tp.agree_kv_tokens(self.model_config, self.kv_dtype,
                                                       max_total_tokens, kv_memory_bytes)
        return KVCache.for_model(
            self.model_config, dtype=self.kv_dtype, device=self.device,
            max_total_tokens=max_total_tokens, kv_memory_bytes=kv_memory_bytes,
        )

    def _log_kv_economy(self) -> None:
        cfg, per_token = self.model_config, bytes_per_token(self.model_config, self.kv_dtype)
        mha = mha_bytes_per_token(cfg, self.kv_dtype)
        windowed = sum(cfg.window_for_layer(i) is not None for i in range(cfg.num_layers))
        logger.info(
            "KV pool (%s): %d tokens x %d B/token = %.1f MiB (%d buffers, %d kv heads, cla %d, "
            "window %s on %d/%d layers, %d global); plain MHA would need %d B/token -> %d tokens",
            self.kv_cache.dtype, self.kv_cache.capacity, per_token, self.kv_cache.total_bytes / 2**20,
            self.kv_cache.num_buffers, cfg.num_kv_heads, cfg.cla_factor, cfg.sliding_window,
            windowed, cfg.num_layers, cfg.global_tokens, mha, self.kv_cache.total_bytes // mha - 1,
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"auto" = bf16 on CPU and GPU (bf16 decodes 2-3x faster than fp32 on 2 CPU cores)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _aligned_rows(blocks: list[torch.Tensor], n: int) -> torch.Tensor:
    """The rows of blocks ([k, n] int64 each) as one flat int64 tensor whose rows all start on
    32 bytes (width `_row_width(n)`, so that their int32 casts' rows start on 16 bytes too).
    Triton specializes a kernel on whether each pointer argument is 16-byte aligned, so views at
    odd offsets of a packed batch made every batch with an odd token count compile (or load from
    disk) the rotary and extend kernels anew, stalling the server mid-run (H200, offline 1024
    requests: 9196 tok/s with a cold kernel cache)."""
    rows = torch.cat(blocks)
    out = torch.zeros(len(rows), _row_width(n), dtype=torch.int64)
    out[:, :n] = rows
    return out.view(-1)


def _row_views(packed: torch.Tensor, start: int, k: int, n: int, *, padded: bool = False) -> torch.Tensor:
    """The k rows of n ints that _aligned_rows put at packed[start:] (padded: with their padding)."""
    width = _row_width(n)
    rows = packed[start : start + k * width].view(k, width)
    return rows if padded else rows[:, :n]


def _row_width(n: int) -> int:
    """n rounded up to a multiple of 4 ints: the staged rows' width."""
    return -(-n // 4) * 4


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name))
               for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
