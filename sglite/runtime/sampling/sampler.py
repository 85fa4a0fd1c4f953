"""Batched sampling: one row per request, each with its own SamplingParams.

Use (once per step; building is cheap, it holds no state between steps):

    batch = SamplingBatch.from_requests(params, output_ids, prompt_ids, eos_ids=eos, device=dev)
    next_ids = batch.sample(logits, allowed_mask=mask)   # int64 [bs] on logits.device

Logprobs are not computed here: the runtime reports them from the raw logits
(runtime/scheduler/sampling.py, runtime/scheduler/output_processor.py).

`sample` never modifies `logits`. Processing order (SGLang / HF):
1. penalties on the logits: repetition_penalty (HF: over prompt + output ids, divide a positive
   logit by it, multiply a negative one), then frequency/presence (OpenAI: over output ids,
   `logit -= frequency * count + presence * (count > 0)`);
2. masks to -inf: EOS ids + stop_token_ids while fewer than min_new_tokens tokens were generated,
   and tokens outside `allowed_mask` (constrained decoding; each row must allow one token);
3. greedy rows (temperature 0 or top_k 1) take the argmax; whole-greedy batches stop here;
4. other rows: softmax(logits / temperature), keep top_k, top_p (the smallest set whose mass
   exceeds top_p, ties ranked by token id; the top token always stays; top_p = 1 keeps all), on
   a GPU by a threshold search (sglite.kernels.top_k_top_p) from 4 rows, else by a sort; min_p
   (prob >= min_p * max prob); then draw with the exponential trick argmax(p / E), E ~ Exp(1) i.i.d.

Seeds: a seeded row draws its noise from a generator seeded with (seed, number of output ids so
far), so its tokens depend only on its own logits and seed: the same across runs and whatever
else is in the batch. Unseeded rows use torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sglite.kernels.reference import top_k_top_p_filter_ref
from sglite.kernels.top_k_top_p import NO_TOP_K, top_k_top_p_filter
from sglite.protocol import SamplingParams
from sglite.runtime.executor.transfer import to_device_async

TOP_K_TOP_P_KERNEL_MIN_BS = 4  # H200 filter alone: bs 1 sort 0.18-0.19 ms vs search 0.27-0.33; bs 8 0.38 vs 0.30-0.33


@dataclass
class SamplingBatch:
    params: list[SamplingParams]
    banned_ids: list[list[int]]  # per row: ids masked for min_new_tokens (empty once reached)
    temperatures: torch.Tensor  # [bs, 1] float32, 1.0 on greedy rows
    top_ps: torch.Tensor  # [bs, 1] float32
    top_ks: torch.Tensor  # [bs, 1] int64, NO_TOP_K when off
    min_ps: torch.Tensor  # [bs, 1] float32
    repetition: torch.Tensor  # [bs, 1] float32 repetition penalties
    frequency: torch.Tensor  # [bs, 1] float32
    presence: torch.Tensor  # [bs, 1] float32
    is_greedy: torch.Tensor  # [bs] bool
    seen: torch.Tensor | None  # [2, n] int64 (row, id): prompt + output ids of repetition rows
    counted: torch.Tensor | None  # [2, n] int64 (row, id): output ids of frequency/presence rows
    banned: torch.Tensor | None  # [2, n] int64 (row, id): banned_ids
    pending_ids: torch.Tensor | None  # [k] device tokens of the first k rows not in output_ids
    uses_penalty: tuple[bool, bool]  # some row uses (repetition, frequency or presence)
    generators: list[torch.Generator | None]  # per row, None: global RNG
    device: torch.device
    # host-side flags, so that choosing a path needs no device sync
    all_greedy: bool
    need_top_k_top_p: bool  # some row uses top_k or top_p
    need_min_p: bool

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]],
                      prompt_ids: Sequence[Sequence[int]] | None = None, *,
                      eos_ids: Sequence[int] = (), device: str | torch.device = "cpu",
                      steps: Sequence[int] | None = None, pending_ids: torch.Tensor | None = None):
        """params / output_ids / prompt_ids: one entry per row. prompt_ids may be None when no row
        uses repetition_penalty. eos_ids: the model's EOS ids (masked until min_new_tokens).
        steps: the index of the token each row samples (seeds its RNG stream); default
        len(output_ids[row]) (the overlapped decode samples one token past its host view).
        pending_ids: [k] device tokens that the first k rows generated but output_ids lack yet
        (the overlapped decode): penalties and min_new_tokens count them.

        Everything per row goes to the device in two host-to-device copies (floats, ints): each
        copy costs the host ~50 us, and a batch with penalties took 12 of them."""
        if len(output_ids) != len(params) or (prompt_ids is not None and len(prompt_ids) != len(params)):
            raise ValueError("params, output_ids and prompt_ids need one entry per request")
        if prompt_ids is None and any(p.repetition_penalty != 1 for p in params):
            raise ValueError("repetition_penalty needs prompt_ids")
        device = torch.device(device)
        bs = len(params)
        greedy = [p.temperature == 0 or p.top_k == 1 for p in params]
        steps = [len(o) for o in output_ids] if steps is None else list(steps)
        num_pending = 0 if pending_ids is None else len(pending_ids)
        generated = [len(o) + (row < num_pending) for row, o in enumerate(output_ids)]
        banned_ids = [[t for t in (*eos_ids, *p.stop_token_ids) if t >= 0] if n < p.min_new_tokens else []
                      for p, n in zip(params, generated)]
        rep_rows = [r for r, p in enumerate(params) if p.repetition_penalty != 1]
        freq_rows = [r for r, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
        pairs = {  # (row, id) pairs, uploaded only when some row needs them
            "seen": _pairs([(r, ids[r]) for r in rep_rows for ids in (prompt_ids, output_ids)]),
            "counted": _pairs([(r, output_ids[r]) for r in freq_rows]),
            "banned": _pairs([(r, ids) for r, ids in enumerate(banned_ids) if ids]),
        }
        floats = torch.tensor([[1.0 if g else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                p.frequency_penalty, p.presence_penalty] for p, g in zip(params, greedy)],
                              dtype=torch.float32).T.reshape(-1)
        ints = [np.array([NO_TOP_K if p.top_k < 0 else p.top_k for p in params], dtype=np.int64),
                np.array(greedy, dtype=np.int64), *(pair.reshape(-1) for pair in pairs.values())]
        floats = to_device_async(floats, device).view(6, bs, 1)
        flat = to_device_async(torch.from_numpy(np.concatenate(ints)), device)
        top_ks, is_greedy, *pair_tensors = flat.split([len(part) for part in ints])
        return cls(
            params=list(params),
            banned_ids=banned_ids,
            temperatures=floats[0], top_ps=floats[1], min_ps=floats[2],
            repetition=floats[3], frequency=floats[4], presence=floats[5],
            top_ks=top_ks.view(-1, 1),
            is_greedy=is_greedy.bool(),
            **{name: t.view(2, -1) if t.numel() else None for name, t in zip(pairs, pair_tensors)},
            pending_ids=pending_ids,
            uses_penalty=(bool(rep_rows), bool(freq_rows)),
            generators=[_row_generator(p.seed, step, device) for p, step in zip(params, steps)],
            device=device,
            all_greedy=all(greedy),
            need_top_k_top_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
            need_min_p=any(p.min_p > 0 for p in params),
        )

    @property
    def batch_size(self) -> int:
        return len(self.params)

    def process_logits(self, logits: torch.Tensor, allowed_mask: torch.Tensor | None = None):
        """Steps 1-2 on a float32 copy of logits [bs, vocab]; returns the copy. No op here waits
        for the device: indices are scattered, never index_put with a host scalar."""
        if logits.dim() != 2 or logits.shape[0] != self.batch_size:
            raise ValueError(f"logits must be [{self.batch_size}, vocab], got {list(logits.shape)}")
        logits = logits.to(torch.float32, copy=True)
        rep, freq = self.uses_penalty
        if rep:
            seen = self._scatter_count(logits, self.seen, torch.bool)
            penalized = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(seen, penalized, logits)
        if freq:
            counts = self._scatter_count(logits, self.counted, torch.float32)
            logits -= self.frequency * counts + self.presence * (counts > 0)
        if self.banned is not None:
            # ids outside [0, vocab) ban nothing: negative ones were dropped on the host, larger
            # ones land in a spare column (a row's id never reaches its neighbour's row, and an
            # out-of-range id never fails the batch); no device sync
            bs, vocab = logits.shape
            rows, ids = self.banned
            ban = torch.zeros(bs * (vocab + 1), dtype=torch.bool, device=logits.device)
            ban.scatter_(0, rows * (vocab + 1) + ids.clamp(max=vocab), True)
            logits.masked_fill_(ban.view(bs, vocab + 1)[:, :vocab], float("-inf"))
        if allowed_mask is not None:
            if allowed_mask.shape != logits.shape or allowed_mask.dtype != torch.bool:
                raise ValueError(f"allowed_mask must be bool {list(logits.shape)}, "
                                 f"got {allowed_mask.dtype} {list(allowed_mask.shape)}")
            if not bool(allowed_mask.any(dim=-1).all()):
                raise ValueError("allowed_mask allows no token for some request")
            logits.masked_fill_(~allowed_mask, float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor, allowed_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits [bs, vocab] -> next token ids int64 [bs]."""
        logits = self.process_logits(logits, allowed_mask)
        greedy_ids = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy_ids
        probs = torch.softmax(logits / self.temperatures, dim=-1)
        probs = self._filter(probs)
        sampled = (probs / self._noise(probs)).argmax(dim=-1)
        return torch.where(self.is_greedy, greedy_ids, sampled)

    # ---- private ------------------------------------------------------------------------------

    def _scatter_count(self, logits: torch.Tensor, pairs: torch.Tensor | None, dtype) -> torch.Tensor:
        """How often each (row, id) of pairs (plus each pending token) occurs, as [bs, vocab] of
        dtype (bool: whether it occurs). Rows outside pairs may count their pending token: their
        penalty is neutral."""
        bs, vocab = logits.shape
        counts = torch.zeros(bs * vocab, dtype=dtype, device=logits.device)
        flat = [] if pairs is None else [self._flat(pairs, vocab)]
        if self.pending_ids is not None:
            rows = torch.arange(len(self.pending_ids), device=logits.device)
            flat.append(rows * vocab + self.pending_ids)
        for index in flat:
            if dtype == torch.bool:
                counts.scatter_(0, index, True)
            else:
                counts.scatter_add_(0, index, torch.ones(index.shape, dtype=dtype, device=index.device))
        return counts.view(bs, vocab)

    @staticmethod
    def _flat(pairs: torch.Tensor, vocab: int) -> torch.Tensor:
        return pairs[0] * vocab + pairs[1]

    def _filter(self, probs: torch.Tensor) -> torch.Tensor:
        if self.need_top_k_top_p:
            # on a GPU by a threshold search (sorting the vocabulary took more time than the rest
            # of sampling together; the search costs a row ~0.3 ms, so at bs < 4 the sort is
            # still faster); on the CPU by the sort, the kernel's reference
            search = probs.is_cuda and probs.shape[0] >= TOP_K_TOP_P_KERNEL_MIN_BS
            select = top_k_top_p_filter if search else top_k_top_p_filter_ref
            probs = select(probs, self.top_ks, self.top_ps)
        if self.need_min_p:
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < top * self.min_ps, 0.0)
        return probs

    def _noise(self, probs: torch.Tensor) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(self.generators):
            if gen is not None:
                noise[row] = torch.empty_like(probs[row]).exponential_(generator=gen)
        # a zero draw would make 0/0 = nan win the argmax for a filtered token
        return noise.clamp_min_(1e-20)


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 output_ids: Sequence[Sequence[int]], *, eos_token_ids: Sequence[int] = (),
                 prompt_ids: Sequence[Sequence[int]] | None = None,
                 allowed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-call form: from_requests + sample."""
    batch = SamplingBatch.from_requests(params, output_ids, prompt_ids, eos_ids=eos_token_ids,
                                        device=logits.device)
    return batch.sample(logits, allowed_mask=allowed_mask)


def _row_generator(seed: int | None, step: int, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    # mix (seed, step) so that consecutive steps and nearby seeds get unrelated streams
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def _pairs(entries: list[tuple[int, Sequence[int]]]) -> np.ndarray:
    """[2, n] int64 (row, id) pairs of (row, ids) entries (a row may come more than once).
    Through numpy: at bs 64 with 800 ids a row, Python lists took 12 ms of host time a step."""
    if not entries:
        return np.empty((2, 0), dtype=np.int64)
    arrays = [np.asarray(ids, dtype=np.int64) for _, ids in entries]
    rows = np.repeat(np.array([r for r, _ in entries], dtype=np.int64), [len(a) for a in arrays])
    return np.stack([rows, np.concatenate(arrays)])
