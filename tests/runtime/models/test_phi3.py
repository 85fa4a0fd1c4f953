"""Phi-3 through the runtime on the CPU against transformers on the same tiny random weights: the
checkpoint's fused qkv_proj / gate_up_proj loaded whole, plain rope with a sliding window on every
layer (Phi-3-mini 4k style, KV freed behind it), and longrope (short factors within
original_max_position_embeddings, long past it, attention factor) with partial rotary
(Phi-4-mini).

Past the original context transformers' generate re-encodes the whole sequence with the long
factors (Phi3ForCausalLM.prepare_inputs_for_generation drops the KV cache at the crossing), which a
prefix-cached runtime does not do (nor do vLLM / SGLang): sglite keeps the earlier positions' KV
and rotates each new position p with long factors once p + 1 > original. That rule is checked
against transformers' own model stepped with its KV cache (no re-encoding)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tests.runtime.models import family

transformers = family.transformers

_SMALL = dict(vocab_size=family.VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=3, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fused_window():
    return transformers.Phi3Config(**_SMALL, max_position_embeddings=256, sliding_window=7)


def _longrope(original=96):
    gen = torch.Generator().manual_seed(3)
    rot = 16 * 3 // 4 // 2  # head_dim 16 x partial 0.75 = 12 rotary dims -> 6 factors
    return transformers.Phi3Config(
        **_SMALL, max_position_embeddings=4 * original, original_max_position_embeddings=original,
        partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": (1 + torch.rand(rot, generator=gen)).tolist(),
                      "long_factor": (2 + 6 * torch.rand(rot, generator=gen)).tolist()})


CASES = {"fused-window": _fused_window, "longrope-partial": _longrope}


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    folder, hf, _ = family.save_model(tmp_path_factory.mktemp(request.param), CASES[request.param](), "phi3")
    return request.param, folder, family.runner_for(folder), hf


def test_checkpoint_is_fused_and_config_read(served):
    name, folder, runner, hf = served
    with safe_open(f"{folder}/model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in keys)
    cfg = runner.model_config
    assert cfg.architecture == "Phi3ForCausalLM" and not cfg.tie_word_embeddings
    if name == "fused-window":
        assert cfg.is_all_windowed and cfg.sliding_window == 7
    else:
        assert cfg.partial_rotary_factor == 0.75 and cfg.original_max_position_embeddings == 96
        assert runner.model.rotary.rotary_dim == 12 and runner.model.rotary.attention_factor > 1


def test_logits_match_transformers(served):
    name, _, runner, hf = served
    # longrope: transformers' full forward rotates a sequence past the original context with the
    # long factors everywhere; within it (here) the two agree at every position
    family.check_logits(runner, hf, lengths=(20, 13))


def test_greedy_32_steps_match_generate(served):
    """Prompts of 7-33 tokens, 32 new: within the original context (96), short factors with the
    attention factor of max/original = 4."""
    _, _, runner, hf = served
    chat_ids = family.check_chat_template(runner, "phi3")
    family.check_generate(runner, hf, family.prompts_for(runner.tokenizer, chat_ids))


@torch.inference_mode()
def test_decode_past_the_original_context_matches_transformers_stepwise(tmp_path):
    folder, hf, _ = family.save_model(tmp_path, _longrope(original=16), "phi3")
    runner = family.runner_for(folder, skip_tokenizer_init=True)
    gen = torch.Generator().manual_seed(5)
    seq = torch.randint(3, family.VOCAB, (40,), generator=gen).tolist()
    prompt = 10
    out = hf(torch.tensor([seq[:prompt]]), use_cache=True)
    cache, ref = out.past_key_values, [out.logits[0, -1]]
    for p in range(prompt, len(seq) - 1):  # one position per forward, as generate would without the drop
        out = hf(torch.tensor([[seq[p]]]), past_key_values=cache, use_cache=True,
                 position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p]))
        cache = out.past_key_values
        ref.append(out.logits[0, -1])
    row = runner.req_to_token.alloc()
    logits = runner.forward(runner.make_extend_batch([row], [0], [seq[:prompt]], runner.token_pool.alloc(prompt)))
    ours = [logits[0]]
    for p in range(prompt, len(seq) - 1):
        ours.append(runner.forward(runner.make_decode_batch([row], [p + 1], [seq[p]], runner.token_pool.alloc(1)))[0])
    torch.testing.assert_close(torch.stack(ours), torch.stack(ref).float(), atol=1e-4, rtol=1e-4)
    # the long factors did matter: with short ones throughout, the logits past position 16 differ
    scaling = dict(runner.model_config.rope_scaling)
    scaling["long_factor"] = scaling["short_factor"]
    short = family.runner_for(folder, skip_tokenizer_init=True, config_overrides=dict(rope_scaling=scaling))
    row = short.req_to_token.alloc()
    short.forward(short.make_extend_batch([row], [0], [seq[:prompt]], short.token_pool.alloc(prompt)))
    for p in range(prompt, 20):
        last = short.forward(short.make_decode_batch([row], [p + 1], [seq[p]], short.token_pool.alloc(1)))[0]
    assert (last - ref[20 - prompt].float()).abs().max() > 1e-2
