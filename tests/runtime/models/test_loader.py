"""Model resolution and loading errors name the path and the problem."""

from __future__ import annotations

import json

import pytest

from sglite.runtime.models.config import ModelConfig
from sglite.runtime.models.loader import load_config, resolve_model


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist.*nope"):
        resolve_model(str(missing))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(f))


def test_unsupported_architecture(tmp_path):
    cfg = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_config(str(tmp_path))


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("gpt-5")
    with pytest.raises(ValueError, match="sliding_window_layers has 2"):
        ModelConfig.from_preset("tiny", sliding_window=4, sliding_window_layers=(True, False))


def test_sliding_window_config_spellings():
    base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 4, "num_attention_heads": 2}
    off = ModelConfig.from_hf_dict({**base, "sliding_window": 16, "use_sliding_window": False})
    assert off.sliding_window is None and off.attention_bias
    qwen = ModelConfig.from_hf_dict({**base, "sliding_window": 16, "use_sliding_window": True,
                                     "max_window_layers": 2})
    assert [qwen.window_for_layer(i) for i in range(4)] == [None, None, 16, 16]
    types = ["sliding_attention", "full_attention"] * 2
    gemma_style = ModelConfig.from_hf_dict({**base, "architectures": ["MistralForCausalLM"],
                                            "sliding_window": 8, "layer_types": types})
    assert [gemma_style.window_for_layer(i) for i in range(4)] == [8, None, 8, None]
    mistral = ModelConfig.from_hf_dict({**base, "architectures": ["MistralForCausalLM"],
                                        "sliding_window": 8, "global_tokens": 4, "cla_factor": 2})
    assert mistral.is_all_windowed and mistral.global_tokens == 4 and mistral.num_kv_buffers == 2


def test_embedded_default_is_converted_once_and_reused():
    folder = resolve_model(None)
    assert resolve_model(None) == folder
    cfg = load_config(folder)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.num_kv_heads == 3 and cfg.tie_word_embeddings
