"""Batched sampling: one row per request, each with its own SamplingParams.

Use (once per step; building is cheap, it holds no state between steps):

    batch = SamplingBatch.from_requests(params, output_ids, prompt_ids, eos_ids=eos, device=dev)
    next_ids = batch.sample(logits, allowed_mask=mask)   # int64 [bs] on logits.device

Logprobs are not computed here: the runtime reports them from the raw logits
(runtime/sampling.py, runtime/output_processor.py).

`sample` never modifies `logits`. Processing order (SGLang / HF):
1. penalties on the logits: repetition_penalty (HF: over prompt + output ids, divide a positive
   logit by it, multiply a negative one), then frequency/presence (OpenAI: over output ids,
   `logit -= frequency * count + presence * (count > 0)`);
2. masks to -inf: EOS ids + stop_token_ids while fewer than min_new_tokens tokens were generated,
   and tokens outside `allowed_mask` (constrained decoding; each row must allow one token);
3. greedy rows (temperature 0 or top_k 1) take the argmax; whole-greedy batches stop here;
4. other rows: softmax(logits / temperature), keep top_k, top_p (the smallest set whose mass
   reaches top_p; the top token always stays), min_p (prob >= min_p * max prob), then draw with
   the exponential trick argmax(p / E), E ~ Exp(1) i.i.d.

Seeds: a seeded row draws its noise from a generator seeded with (seed, number of output ids so
far), so its tokens depend only on its own logits and seed: the same across runs and whatever
else is in the batch. Unseeded rows use torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sglite.protocol import SamplingParams
from sglite.runtime.transfer import tensor_async

_NO_TOP_K = 1 << 30


@dataclass
class SamplingBatch:
    params: list[SamplingParams]
    output_ids: list[list[int]]
    prompt_ids: list[list[int]] | None
    pending_ids: torch.Tensor | None  # [k] device tokens of the first k rows not in output_ids
    banned_ids: list[list[int]]  # per row: ids masked for min_new_tokens (empty once reached)
    temperatures: torch.Tensor  # [bs, 1] float32, 1.0 on greedy rows
    top_ps: torch.Tensor  # [bs, 1] float32
    top_ks: torch.Tensor  # [bs, 1] int64, _NO_TOP_K when off
    min_ps: torch.Tensor  # [bs, 1] float32
    is_greedy: torch.Tensor  # [bs] bool
    generators: list[torch.Generator | None]  # per row, None: global RNG
    device: torch.device
    # host-side flags, so that choosing a path needs no device sync
    all_greedy: bool
    need_sort: bool  # some row uses top_k or top_p
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
        (the overlapped decode): penalties and min_new_tokens count them."""
        if len(output_ids) != len(params) or (prompt_ids is not None and len(prompt_ids) != len(params)):
            raise ValueError("params, output_ids and prompt_ids need one entry per request")
        if prompt_ids is None and any(p.repetition_penalty != 1 for p in params):
            raise ValueError("repetition_penalty needs prompt_ids")
        device = torch.device(device)
        greedy = [p.temperature == 0 or p.top_k == 1 for p in params]
        steps = [len(o) for o in output_ids] if steps is None else list(steps)
        num_pending = 0 if pending_ids is None else len(pending_ids)
        generated = [len(o) + (row < num_pending) for row, o in enumerate(output_ids)]

        def column(values, dtype):
            return tensor_async(values, dtype, device).view(-1, 1)

        return cls(
            params=list(params),
            output_ids=[list(o) for o in output_ids],
            prompt_ids=None if prompt_ids is None else [list(x) for x in prompt_ids],
            pending_ids=pending_ids,
            banned_ids=[[*eos_ids, *p.stop_token_ids] if n < p.min_new_tokens else []
                        for p, n in zip(params, generated)],
            temperatures=column([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                torch.float32),
            top_ps=column([p.top_p for p in params], torch.float32),
            top_ks=column([_NO_TOP_K if p.top_k < 0 else p.top_k for p in params], torch.int64),
            min_ps=column([p.min_p for p in params], torch.float32),
            is_greedy=tensor_async(greedy, torch.bool, device),
            generators=[_row_generator(p.seed, step, device) for p, step in zip(params, steps)],
            device=device,
            all_greedy=all(greedy),
            need_sort=any(p.top_k > 0 or p.top_p < 1 for p in params),
            need_min_p=any(p.min_p > 0 for p in params),
        )

    @property
    def batch_size(self) -> int:
        return len(self.params)

    def process_logits(self, logits: torch.Tensor, allowed_mask: torch.Tensor | None = None):
        """Steps 1-2 on a float32 copy of logits [bs, vocab]; returns the copy."""
        if logits.dim() != 2 or logits.shape[0] != self.batch_size:
            raise ValueError(f"logits must be [{self.batch_size}, vocab], got {list(logits.shape)}")
        logits = logits.to(torch.float32, copy=True)
        if any(p.repetition_penalty != 1 for p in self.params):
            self._apply_repetition_penalty(logits)
        if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in self.params):
            self._apply_frequency_presence(logits)
        if any(self.banned_ids):
            rows, cols = _row_col(self.banned_ids, self.device)
            logits[rows, cols] = float("-inf")
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

    def _apply_repetition_penalty(self, logits: torch.Tensor) -> None:
        ids = [p + o for p, o in zip(self.prompt_ids, self.output_ids)]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[_row_col(ids, self.device)] = True
        if self.pending_ids is not None:
            seen[torch.arange(len(self.pending_ids), device=self.device), self.pending_ids] = True
        penalty = tensor_async([p.repetition_penalty for p in self.params], torch.float32, self.device)
        penalty = penalty.view(-1, 1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))

    def _apply_frequency_presence(self, logits: torch.Tensor) -> None:
        rows, cols = _row_col(self.output_ids, self.device)
        counts = torch.zeros_like(logits)
        counts.index_put_((rows, cols), torch.ones_like(rows, dtype=logits.dtype), accumulate=True)
        if self.pending_ids is not None:
            pending_rows = torch.arange(len(self.pending_ids), device=self.device)
            counts.index_put_((pending_rows, self.pending_ids),
                              torch.ones_like(pending_rows, dtype=logits.dtype), accumulate=True)
        freq = tensor_async([p.frequency_penalty for p in self.params], torch.float32, self.device)
        pres = tensor_async([p.presence_penalty for p in self.params], torch.float32, self.device)
        logits -= freq.view(-1, 1) * counts + pres.view(-1, 1) * (counts > 0)

    def _filter(self, probs: torch.Tensor) -> torch.Tensor:
        if self.need_sort:
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            rank = torch.arange(probs.shape[-1], device=self.device).view(1, -1)
            drop = (rank >= self.top_ks) | (sorted_probs.cumsum(-1) - sorted_probs > self.top_ps)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
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


def _row_col(ids_per_row: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, column) index tensors for a ragged list of id lists."""
    rows = [r for r, ids in enumerate(ids_per_row) for _ in ids]
    cols = [i for ids in ids_per_row for i in ids]
    return tensor_async(rows, torch.int64, device), tensor_async(cols, torch.int64, device)
