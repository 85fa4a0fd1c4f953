"""Gemma 2 and Gemma 3 (text) on the Llama layers.

What differs from Llama: the embedding output is scaled by sqrt(hidden_size) (rounded to the
dtype, as transformers does); every RMSNorm multiplies by (1 + weight) in fp32; each decoder layer
is a sandwich (input / post-attention norms around attention, pre- / post-feedforward norms
around the MLP); the MLP is GeGLU (gelu_pytorch_tanh); attention scores are scaled by
query_pre_attn_scalar^-1/2. Gemma 2 soft-caps attention scores (50) and the final logits (30).
Gemma 3 has no soft-caps but RMSNorms q and k per head, and its sliding-window layers rotate with
a local base (rope_local_base_freq, no scaling) while the global layers use rope_theta and
rope_scaling.

Sliding-window and global layers alternate (config.sliding_window_layers): each layer's window goes
to the attention backend through AttentionLayer, as for Mistral / Qwen2. Since some layers are
global, no KV can be freed behind the window (ModelConfig.is_all_windowed is False, so the
scheduler's window freeing stays off for these models).

Batch-1 decode on CUDA: the four decoder projections run sglite.kernels.gemv (one row, no split-K;
layers/linear.py dispatches on the `one_row_gemv` flag set here), and the norms and GeGLU let the
next launch start early (pdl.py's chained launch), so each GEMV streams its first weights while
the kernel before it runs (Gemma-2-9B on an H200: replay 5.93 -> 5.34 ms, docs/benchmarks.md).
Gemma 2's qkv GEMV also rotates q / k and stores K / V, and gate_up applies GeGLU, in their
epilogues (sglite.kernels.gemv_pairs: one launch each instead of two). Outside the layers the
scaled embedding with the rope's cos / sin (embed_rope.py) and the final soft-cap with the fp32
cast (softcap.py) are one launch each, bit-equal to the torch code on an H200 (replay -0.02 ms).

Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration, 4B and up) are not served; the
text-only Gemma3ForCausalLM (gemma-3-1b, or a text model extracted from a larger one) is.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.executor.attention.base import BaseAttentionBackend, ForwardBatch
from sglite.runtime.models.config import ModelConfig
from sglite.runtime.models.layers import GatedMLP
from sglite.runtime.models.layers.fused import use_fused
from sglite.runtime.models.layers.linear import QuantLinear
from sglite.runtime.models.layers.rotary import rotary_from_config
from sglite.runtime.models.llama import LlamaAttention, LlamaForCausalLM, logit_rows


class GemmaRMSNorm(nn.Module):
    """RMSNorm with (1 + weight), all in fp32, rounded once (transformers' Gemma2RMSNorm).

    On CUDA the fused norm kernels run with 1 + weight precomputed in fp32 (refresh_fused() after
    loading); they round the normalized row to the dtype before the product, one rounding more
    than the torch path (bf16 only; fp32 is exact either way)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self._plus_one: torch.Tensor | None = None

    def refresh_fused(self) -> None:
        self._plus_one = self.weight.detach().float() + 1.0

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_fused(x) and self._plus_one is not None:
            from sglite.kernels.norm import fused_add_rms_norm, rms_norm

            if residual is not None:
                return fused_add_rms_norm(x, residual, self._plus_one, self.eps, early=_chain())
            rows = x.reshape(-1, x.shape[-1])
            return rms_norm(rows, self._plus_one, self.eps, early=_chain()).view(x.shape)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def then_add_norm(self, x: torch.Tensor, residual: torch.Tensor, nxt: "GemmaRMSNorm"):
        """The sandwich pair: nxt(self(x), residual) -> (normed, new residual). On CUDA one
        launch (sglite.kernels.norm.norm_add_rms_norm), in place on x and residual, rounded as
        the two fused launches it replaces."""
        if use_fused(x) and self._plus_one is not None and nxt._plus_one is not None:
            from sglite.kernels.norm import norm_add_rms_norm

            return norm_add_rms_norm(x, residual, self._plus_one, nxt._plus_one, self.eps, nxt.eps,
                                     early=_chain())
        return nxt(self(x), residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


# batch-1 decode's launches outside the layers, on CUDA: the embedding's scale and the rope's
# cos / sin in one launch, the final soft-cap with the fp32 cast in one (four and five torch
# launches before). SGLITE_GEMMA_FUSED_ENDS=0 keeps the torch code (read at call time: benchmarks
# flip FUSED_EMBED / FUSED_SOFTCAP)
FUSED_EMBED = FUSED_SOFTCAP = os.environ.get("SGLITE_GEMMA_FUSED_ENDS", "1") != "0"


def _chain() -> bool:
    """Whether the norms and the activation let the next kernel launch early (pdl.py): where the
    projections after them are the one-row GEMV (a PDL launch that loads weights before its wait)."""
    from sglite.kernels import gemv

    return gemv.ENABLED


class GemmaAttention(LlamaAttention):
    norm_cls = GemmaRMSNorm  # Gemma 3's q/k norms

    def forward(self, x, cos, sin, batch: ForwardBatch, backend: BaseAttentionBackend):
        dest = self.fused_qkv_dest(x, cos, batch, backend)
        if dest is None:
            return super().forward(x, cos, sin, batch, backend)
        return self.forward_fused(x, cos, sin, batch, backend, dest)

    def fused_qkv_dest(self, x, cos, batch, backend):
        """Where batch-1 decode's qkv projection, rotary and KV store run as one launch
        (sglite.kernels.gemv_pairs.gemv_rope): the pool's (k_buffer, v_buffer, slots); None where
        that does not apply (q/k norms, a layer without KV, partial rotary, an FP8 pool, a
        quantized qkv, more than one row)."""
        from sglite.kernels import gemv, gemv_pairs

        proj = self.qkv_proj
        if not (gemv_pairs.ROPE and getattr(proj, "one_row_gemv", False) and proj.quant_method is None
                and self.produces_kv and not self.qk_norm and cos.dim() == 2
                and 2 * cos.shape[-1] == self.head_dim and gemv.use_gemv(x, proj.weight, proj.bias)):
            return None
        dest = backend.kv_destination(self.attn, batch)
        if dest is None or dest[0].dtype != x.dtype or dest[2].shape != (1,):
            return None
        return dest

    def forward_fused(self, x, cos, sin, batch, backend, dest, norm=None):
        """The attention sublayer with gemv_rope (dest from fused_qkv_dest). norm = (residual,
        post, pre): x is the previous sublayer's raw output, and the sandwich pair before this
        sublayer runs inside the projection too (gemv_pairs' NORM prologue); returns (output,
        new residual) then."""
        from sglite.kernels import gemv_pairs

        out = gemv_pairs.gemv_rope(x, self.qkv_proj.weight, cos, sin, *dest, num_heads=self.num_heads,
                                   num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                   norm=_norm_args(norm))
        out, residual = out if norm is not None else (out, None)
        q, k, v = out.split([self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2, -1)
        o = backend.forward(q.view(1, self.num_heads, self.head_dim), k.view(1, self.num_kv_heads, self.head_dim),
                            v.view(1, self.num_kv_heads, self.head_dim), self.attn, batch, kv_stored=True,
                            prefetch_kv=True)
        o = self.o_proj(o.reshape(1, self.num_heads * self.head_dim))
        return o if norm is None else (o, residual)


def _norm_args(norm):
    """(residual, post, pre) GemmaRMSNorms -> gemv_pairs' norm argument (1 + w in fp32, eps)."""
    if norm is None:
        return None
    residual, post, pre = norm
    return residual, post._plus_one, pre._plus_one, post.eps, pre.eps


def _norm_fusable(*norms: GemmaRMSNorm) -> bool:
    """Whether the sandwich pair may run inside the next projection (gemv_pairs.NORM, CUDA
    weights refreshed)."""
    from sglite.kernels import gemv_pairs

    return gemv_pairs.NORM and all(n._plus_one is not None for n in norms)


class GemmaMLP(GatedMLP):
    def fused(self, x: torch.Tensor) -> bool:
        """Whether batch-1 decode's gate_up and GeGLU run as one launch (gemv_pairs.gemv_glu)."""
        from sglite.kernels import gemv, gemv_pairs

        proj = self.gate_up_proj
        return (gemv_pairs.GLU and getattr(proj, "one_row_gemv", False) and proj.quant_method is None
                and gemv.use_gemv(x, proj.weight, proj.bias))

    def forward(self, x: torch.Tensor, norm=None):
        """norm = (residual, post, pre), only where fused(x): as GemmaAttention.forward_fused's
        (returns (output, new residual))."""
        from sglite.kernels import gemv_pairs

        if norm is None and not self.fused(x):
            return super().forward(x)
        out = gemv_pairs.gemv_glu(x, self.gate_up_proj.weight, gelu=self.act == "gelu_pytorch_tanh",
                                  norm=_norm_args(norm))
        if norm is None:
            return self.down_proj(out)
        return self.down_proj(out[0]), out[1]


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = GemmaAttention(config, layer_id)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = GemmaMLP(h, config.intermediate_size, act=config.hidden_act)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.is_sliding = config.window_for_layer(layer_id) is not None
        # batch-1 decode: the four projections through the one-row GEMV (layers/linear.py), the
        # activation before down_proj launching it early; o / down as QuantLinear for that hook
        # (same parameter names; FP8 and tensor parallelism replace or refuse them as before)
        self.self_attn.o_proj = QuantLinear(self.self_attn.o_proj)
        self.mlp.down_proj = QuantLinear(self.mlp.down_proj)
        self.mlp.early_act = True
        set_one_row_gemv(self)

    def forward(self, x, residual, cos, sin, batch, backend, prev: "GemmaDecoderLayer | None" = None):
        """x is the previous layer's MLP output (prev's), before its post-feedforward norm and
        not yet added to the residual stream; the embedding for the first layer (residual None).
        Returns this layer's MLP output and the residual stream in the same form: each sandwich
        norm pair (a sublayer's post-norm and the next pre-norm, with the residual add between)
        runs as one launch on CUDA (GemmaRMSNorm.then_add_norm), or at batch-1 decode inside the
        projection after it (gemv_pairs' NORM prologue)."""
        attn = self.self_attn
        if residual is None:
            x, residual = self.input_layernorm(x), x
            x = attn(x, cos, sin, batch, backend)
        elif _norm_fusable(prev.post_feedforward_layernorm, self.input_layernorm) and (
                dest := attn.fused_qkv_dest(x, cos, batch, backend)) is not None:  # batch 1: the pair in qkv
            x, residual = attn.forward_fused(x, cos, sin, batch, backend, dest,
                                             norm=(residual, prev.post_feedforward_layernorm, self.input_layernorm))
        else:
            x, residual = prev.post_feedforward_layernorm.then_add_norm(x, residual, self.input_layernorm)
            x = attn(x, cos, sin, batch, backend)
        post, pre = self.post_attention_layernorm, self.pre_feedforward_layernorm
        if _norm_fusable(post, pre) and self.mlp.fused(x):  # batch 1: the pair inside gate_up
            return self.mlp(x, norm=(residual, post, pre))
        x, residual = post.then_add_norm(x, residual, pre)
        return self.mlp(x), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_cls = GemmaDecoderLayer

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # Gemma 3: sliding layers rotate with the local base, unscaled
        self.rotary_local = None
        if config.rope_local_theta is not None:
            self.rotary_local = rotary_from_config(config, theta=config.rope_local_theta, scaling=None)

    def forward(self, batch: ForwardBatch, backend: BaseAttentionBackend) -> torch.Tensor:
        x, rope, rope_local = self._embed(batch)
        residual, prev = None, None
        for layer in self.model.layers:
            cos, sin = rope_local if layer.is_sliding else rope
            x, residual = layer(x, residual, cos, sin, batch, backend, prev)
            prev = layer
        rows, num_rows = logit_rows(batch, x.device)
        if rows is not None:
            x, residual = x[rows], residual[rows]
        x = prev.post_feedforward_layernorm.then_add_norm(x, residual, self.model.norm)[0]
        logits = F.linear(x, self.lm_head_weight)[:num_rows]
        cap = self.config.final_logit_softcapping
        if FUSED_SOFTCAP and use_fused(logits):
            from sglite.kernels.softcap import softcap_logits

            return softcap_logits(logits, cap)  # the cast and the cap: one launch
        logits = logits.float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _embed(self, batch: ForwardBatch):
        """The scaled embedding (sqrt(hidden) rounded to the dtype, as transformers) and the
        (cos, sin) of the global and the local rope; on CUDA one launch where the rope is a plain
        one (sglite.kernels.embed_rope: Gemma 2), else the torch code / rotary kernels."""
        embed, rotary = self.model.embed_tokens, self.rotary
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=embed.weight.dtype)
        # (use_fused also decides rotary.py's fused cos / sin layout, [T, D / 2] fp32)
        if (FUSED_EMBED and use_fused(batch.input_ids) and type(embed) is nn.Embedding
                and self.rotary_local is None and not rotary.partial and rotary.attention_factor == 1.0
                and rotary.kind in ("default", "linear", "llama3", "yarn")):
            from sglite.kernels.embed_rope import embed_rope

            x, cos, sin = embed_rope(batch.input_ids, embed.weight, scale.item(), batch.positions,
                                     rotary.inv_freq_on(batch.input_ids.device), early=_chain())
            return x, (cos, sin), (cos, sin)
        x = embed(batch.input_ids) * scale  # rounded as transformers
        rope = rotary(batch.positions, x.dtype)
        return x, rope, rope if self.rotary_local is None else self.rotary_local(batch.positions, x.dtype)

    def load_weights(self, weights) -> None:
        super().load_weights(weights)
        self._refresh_norms()

    def init_dummy_weights(self, seed: int = 0) -> None:
        super().init_dummy_weights(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.data.zero_()  # (1 + weight): 0 is the identity scale
        self._refresh_norms()

    def _refresh_norms(self) -> None:
        for module in self.modules():
            if isinstance(module, GemmaRMSNorm):
                module.refresh_fused()


GEMV_PROJECTIONS = ("qkv", "o", "gate_up", "down")


def set_one_row_gemv(module: nn.Module, which: tuple[str, ...] = GEMV_PROJECTIONS) -> int:
    """The decoder layers (of a model, or one layer) whose projections named in `which` (of qkv /
    o / gate_up / down) take the one-row GEMV at batch 1; the others go back to cuBLAS. Returns
    how many projections have it (benchmarks: bench/decode_floor.py --variants)."""
    unknown = set(which) - set(GEMV_PROJECTIONS)
    if unknown:
        raise ValueError(f"set_one_row_gemv: unknown projections {sorted(unknown)} (of {GEMV_PROJECTIONS})")
    layers = module.model.layers if hasattr(module, "model") else [module]
    count = 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        lins = dict(qkv=attn.qkv_proj, o=attn.o_proj, gate_up=mlp.gate_up_proj, down=mlp.down_proj)
        for name, lin in lins.items():
            lin.one_row_gemv = name in which
            count += name in which
    return count


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: the same layers with q/k norms (config.qk_norm) and local rope bases."""
