"""Loading HF folders: sharded safetensors through model.safetensors.index.json (only the listed
shards, a missing one named), tied and untied heads, and the folders sglite refuses with a
message that says what to do: PyTorch .bin only, an unsupported quantization_config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sglite.runtime.models.loader import iter_weights, resolve_model
from tests.runtime.models import family

transformers = family.transformers


def _llama(tie: bool):
    return transformers.LlamaConfig(vocab_size=family.VOCAB, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_llama(False), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    hf.save_pretrained(folder, max_shard_size="60KB")  # ~10 shards of a ~400 KB model
    return folder, hf


def test_sharded_untied_checkpoint_loads_every_shard_and_matches(sharded):
    folder, hf = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and not (folder / "model.safetensors").exists()
    # a stray file beside the index (say a consolidated copy) is not read
    save_file({"junk.weight": torch.zeros(3)}, str(folder / "consolidated.safetensors"))
    names = [n for n, _ in iter_weights(str(folder))]
    assert sorted(names) == sorted(index["weight_map"]) and "lm_head.weight" in names
    runner = family.runner_for(str(folder), skip_tokenizer_init=True)
    assert runner.model.lm_head is not None
    family.check_logits(runner, hf, lengths=(16, 11))


def test_missing_shard_is_named(sharded, tmp_path):
    folder, _ = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    for f in folder.iterdir():
        if f.name != first:
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=f"lacks.*{first}"):
        list(iter_weights(str(tmp_path)))


def test_tied_head_ignores_a_stored_copy(tmp_path):
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(_llama(True), dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # as some exports do
    save_file(weights, str(tmp_path / "model.safetensors"))
    runner = family.runner_for(str(tmp_path), skip_tokenizer_init=True)
    assert runner.model.lm_head is None
    family.check_logits(runner, hf, lengths=(16, 11))


def test_untied_config_without_head_says_what_to_do(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(_llama(True), dtype=torch.float32)
    hf.save_pretrained(tmp_path)  # no lm_head.weight stored
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no lm_head.weight.*tie_word_embeddings.*true"):
        family.runner_for(str(tmp_path), skip_tokenizer_init=True)


def test_bin_only_folder_is_refused_with_the_conversion(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(_llama(True), dtype=torch.float32)
    hf.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safetensors only.*save_pretrained"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(tmp_path), need_weights=False) == str(tmp_path)  # dummy weights: fine


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_unknown_quantization_is_refused_with_what_to_do(tmp_path, method):
    hf = transformers.AutoModelForCausalLM.from_config(_llama(True), dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"quant_method '{method}'.*cannot load.*unquantized"):
        resolve_model(str(tmp_path))
