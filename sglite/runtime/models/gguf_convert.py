"""GGUF (llama.cpp) -> HF-style folder: config.json, tokenizer files, model.safetensors.

Quantized tensors are dequantized with the `gguf` package. llama.cpp's converter permutes the rows
of q_proj/k_proj (interleaved rope layout); we undo it so the HF rotate_half rope applies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

_GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: torch.dtype = torch.bfloat16) -> str:
    """Writes the folder atomically (temp dir + rename); if it already exists, reuses it."""
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if (out_dir / "config.json").exists():
        return str(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = GGUFReader(str(gguf_path))
    config = _hf_config(reader, gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = _hf_tensors(reader, config, dtype)
        if "lm_head.weight" not in tensors:
            config["tie_word_embeddings"] = True
        _save(tmp, config, tensors, dtype)
        _save_tokenizer(reader, gguf_path, tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: keep its folder
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out_dir)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_config(reader, path: Path) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    a = f"{arch}."
    num_heads = _field(reader, a + "attention.head_count")
    hidden = _field(reader, a + "embedding_length")
    vocab = _field(reader, a + "vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, a + "feed_forward_length"),
        "num_hidden_layers": _field(reader, a + "block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _field(reader, a + "attention.head_count_kv", num_heads),
        "head_dim": _field(reader, a + "rope.dimension_count", hidden // num_heads),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": _field(reader, a + "context_length", 4096),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }


def _hf_tensors(reader, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
        else:
            name = f"{_GGUF_TO_HF[parts[0]]}.{parts[1]}"
        w = dequantize(t.data, t.tensor_type)  # float32 numpy, HF [out, in] layout
        if name.endswith("q_proj.weight"):
            w = _unpermute_rope(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rope(w, config["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, copy=True)).to(dtype)
    return out


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, rows (pairs interleaved) -> (halves)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _save(folder: Path, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    from safetensors.torch import save_file

    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _save_tokenizer(reader, gguf_path: Path, folder: Path) -> None:
    """Builds the GPT-2 style byte-level BPE tokenizer from the GGUF vocab and merges.

    Built by hand because transformers' GGUF tokenizer conversion (4.57) gets this model wrong:
    it sets eos to <|im_start|> and adds a BOS the GGUF says not to add.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok = Tokenizer(bpe)
    # llama.cpp's "smollm"/"starcoder" pre-tokenizer: single digits, then the GPT-2 regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # 3 = CONTROL in GGUF
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    name = lambda key: tokens[_field(reader, key)] if _field(reader, key) is not None else None
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("tokenizer.ggml.bos_token_id"),
        eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    if not hf_tok.chat_template:
        raise ValueError(f"{gguf_path}: the GGUF carries no chat template")
    hf_tok.save_pretrained(str(folder))
