"""Model configuration: one frozen dataclass for the whole Llama family, read from HF config.json.

Besides the checkpoint's own facts it carries the KV-economy knobs of issue 7: `num_kv_heads`
(GQA, 1 = MQA), `cla_factor` (Cross-Layer Attention: k adjacent layers share the KV the first of
them produces), `sliding_window` with an optional per-layer pattern, and `global_tokens` (the first
G positions stay visible to every later query, Longformer-style attention sinks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sglite.runtime.models.registry import check_architecture



@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict: {"rope_type": "llama3"|"linear", "factor": ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096  # context length
    qk_norm: bool = False  # Qwen3: RMSNorm over each q/k head before rope
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    sliding_window: int | None = None  # W: a query at p sees keys p-W < j <= p (plus globals)
    sliding_window_layers: tuple[bool, ...] | None = None  # None: W applies to every layer
    global_tokens: int = 0  # G: keys j < G are visible to every later query
    cla_factor: int = 1  # layers [i*k, (i+1)*k) share the KV produced by layer i*k
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # checkpoint dtype as written in config.json
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); num_experts 0: a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # of each routed expert (intermediate_size: dense layers)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a sigmoid-gated shared expert
    moe_layers: tuple[bool, ...] | None = None  # None: every layer is sparse
    # Gemma 2 / 3 and Phi-3 (issue 18)
    hidden_act: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by its -1/2, not head_dim's
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the logits
    rope_local_theta: float | None = None  # Gemma 3: rope base of the sliding-window layers
    partial_rotary_factor: float = 1.0  # Phi-4-mini: rope on the first 3/4 of each head
    original_max_position_embeddings: int | None = None  # Phi-3 longrope: the pretraining context

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.cla_factor < 1:
            raise ValueError(f"cla_factor must be >= 1, got {self.cla_factor}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {self.global_tokens}")
        layers = self.sliding_window_layers
        if layers is not None and len(layers) != self.num_layers:
            raise ValueError(
                f"sliding_window_layers has {len(layers)} entries for {self.num_layers} layers"
            )

    # --- per-layer facts -------------------------------------------------------------------
    def window_for_layer(self, layer_id: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and not self.sliding_window_layers[layer_id]:
            return None
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.num_experts > 0 and (self.moe_layers is None or self.moe_layers[layer_id])

    def kv_layer_id(self, layer_id: int) -> int:
        """Index of the KV buffer a layer reads (= index of its CLA group)."""
        return layer_id // self.cla_factor

    def produces_kv(self, layer_id: int) -> bool:
        return layer_id % self.cla_factor == 0

    @property
    def num_kv_buffers(self) -> int:
        return -(-self.num_layers // self.cla_factor)

    @property
    def is_all_windowed(self) -> bool:
        """True when every layer is windowed, so KV behind the window can be freed."""
        return all(self.window_for_layer(i) is not None for i in range(self.num_layers))

    # --- constructors ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> ModelConfig:
        arch = (d.get("architectures") or ["?"])[0]
        check_architecture(arch)
        num_heads = d["num_attention_heads"]
        num_layers = d["num_hidden_layers"]
        window, window_layers = _read_sliding_window(d, arch, num_layers)
        eos = d.get("eos_token_id")
        fields = dict(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=d.get("rope_scaling"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            # absent: transformers' default (True), which save_pretrained leaves out (Gemma)
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            attention_bias=bool(d.get("attention_bias", d.get("qkv_bias", arch in _QKV_BIAS))),
            sliding_window=window,
            sliding_window_layers=window_layers,
            global_tokens=int(d.get("global_tokens", 0)),
            cla_factor=int(d.get("cla_factor", 1)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=d.get("torch_dtype"),
        )
        fields.update(_read_moe(d, arch, num_layers))
        fields.update(_read_dense_family(d, arch))
        return cls(**{**fields, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides) -> ModelConfig:
        return dataclasses.replace(self, **overrides)


_QKV_BIAS = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")  # bias on q/k/v unless the config says


def _read_moe(d: dict, arch: str, num_layers: int) -> dict:
    """The MoE fields: Mixtral always renormalises its top-k; Qwen2/3-MoE as norm_topk_prob says,
    with dense layers at mlp_only_layers and off the decoder_sparse_step grid."""
    if arch == "MixtralForCausalLM":
        return dict(num_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                    moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True)
    if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return {}
    step, dense = d.get("decoder_sparse_step", 1), set(d.get("mlp_only_layers") or ())
    layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    return dict(num_experts=d["num_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0)
                if arch == "Qwen2MoeForCausalLM" else 0,
                moe_layers=None if all(layers) else layers)


def _read_dense_family(d: dict, arch: str) -> dict:
    """Gemma 2 / 3 and Phi-3 fields; other families keep the defaults."""
    out = {}
    if arch in _GEMMA:
        out.update(hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
                   query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
                   attn_logit_softcapping=d.get("attn_logit_softcapping"),
                   final_logit_softcapping=d.get("final_logit_softcapping"))
        if arch == "Gemma3ForCausalLM":
            out["rope_local_theta"] = float(d.get("rope_local_base_freq", 10000.0))
    elif d.get("hidden_act", "silu") != "silu":
        out["hidden_act"] = d["hidden_act"]
    if "partial_rotary_factor" in d:
        out["partial_rotary_factor"] = float(d["partial_rotary_factor"])
    if d.get("original_max_position_embeddings"):
        out["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
    return out


_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def _read_sliding_window(d: dict, arch: str, num_layers: int):
    """Returns (W, per-layer flags) from the three config spellings found in the wild."""
    window = d.get("sliding_window")
    # Qwen configs carry a window value that is off unless enabled
    if arch in _QWEN_WINDOW_OPT_IN and not d.get("use_sliding_window", False):
        return None, None
    if window is None:
        return None, None
    layer_types = d.get("layer_types")
    if layer_types is not None:  # Gemma-2 / newer transformers
        flags = tuple(t == "sliding_attention" for t in layer_types)
    elif arch == "Gemma2ForCausalLM":  # older configs: every other layer from the first
        flags = tuple(i % 2 == 0 for i in range(num_layers))
    elif arch == "Gemma3ForCausalLM":  # older configs: every sliding_window_pattern-th is global
        pattern = int(d.get("sliding_window_pattern", 6))
        flags = tuple((i + 1) % pattern != 0 for i in range(num_layers))
    elif arch in _QWEN_WINDOW_OPT_IN and "max_window_layers" in d:
        # Qwen2: layers at index >= max_window_layers use the window
        flags = tuple(i >= d["max_window_layers"] for i in range(num_layers))
    else:
        return int(window), None
    if not any(flags):
        return None, None
    return int(window), (None if all(flags) else flags)


_QWEN_WINDOW_OPT_IN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
                       "Qwen3MoeForCausalLM")
_LLAMA3_EOS = (128001, 128008, 128009)
PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        rope_theta=500000.0, max_position_embeddings=8192, eos_token_ids=_LLAMA3_EOS,
        bos_token_id=128000, torch_dtype="bfloat16",
    ),
    "llama-3.2-1b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        eos_token_ids=_LLAMA3_EOS, bos_token_id=128000, torch_dtype="bfloat16",
    ),
    "smollm2-135m": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        eos_token_ids=(2,), bos_token_id=1, torch_dtype="bfloat16",
    ),
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_ids=(2,), bos_token_id=1,
    ),
}
