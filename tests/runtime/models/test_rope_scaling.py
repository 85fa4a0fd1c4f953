"""RoPE scaling against transformers' own rotary classes: linear, llama3, yarn (static), dynamic
NTK and longrope / su (length-dependent: a token at position p must get the cos/sin transformers
gives it when generating it one step at a time, i.e. at sequence length p + 1), partial rotary."""

from __future__ import annotations

import pytest
import torch

from sglite.runtime.models.layers.rotary import RotaryEmbedding, apply_rotary

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

HEAD_DIM = 32
POSITIONS = 40  # crosses the original context (16) of the length-dependent cases


def _longrope(kind):
    gen = torch.Generator().manual_seed(0)
    return {"type": kind, "short_factor": (1 + torch.rand(HEAD_DIM // 2, generator=gen)).tolist(),
            "long_factor": (1 + 4 * torch.rand(HEAD_DIM // 2, generator=gen)).tolist()}


CASES = {
    "linear": lambda: (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama3": lambda: (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "yarn": lambda: (transformers.Qwen2Config, dict(rope_theta=1e6, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "dynamic": lambda: (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "dynamic", "factor": 3.0})),
    "longrope": lambda: (transformers.Phi3Config, dict(original_max_position_embeddings=16,
                                                       rope_scaling=_longrope("longrope"))),
    "su": lambda: (transformers.Phi3Config, dict(original_max_position_embeddings=16,
                                                 rope_scaling=_longrope("su"))),
    "longrope-partial": lambda: (transformers.Phi3Config, dict(
        original_max_position_embeddings=16, partial_rotary_factor=0.5,
        rope_scaling={**_longrope("longrope"), "short_factor": _longrope("x")["short_factor"][:8],
                      "long_factor": _longrope("x")["long_factor"][:8]})),
}


def _hf(case):
    cls, kw = CASES[case]()
    config = cls(vocab_size=64, hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, num_hidden_layers=1, max_position_embeddings=16, **kw)
    rotary_cls = Phi3RotaryEmbedding if cls is transformers.Phi3Config else LlamaRotaryEmbedding
    return config, rotary_cls(config)


def _ours(config) -> RotaryEmbedding:
    rotary_dim = int(HEAD_DIM * getattr(config, "partial_rotary_factor", 1.0))
    return RotaryEmbedding(HEAD_DIM, theta=config.rope_theta, scaling=config.rope_scaling,
                           rotary_dim=rotary_dim, max_position=config.max_position_embeddings,
                           original_max_position=getattr(config, "original_max_position_embeddings", None))


@pytest.mark.parametrize("case", list(CASES))
def test_cos_sin_match_transformers_step_by_step(case):
    config, hf = _hf(case)
    ours = _ours(config)
    cos, sin = ours(torch.arange(POSITIONS), torch.float32)  # [T, 1, rotary_dim]
    x = torch.zeros(1, HEAD_DIM)
    for p in range(POSITIONS):  # transformers as generate calls it: one new position per step
        hf_cos, hf_sin = hf(x, torch.tensor([[p]]))
        torch.testing.assert_close(cos[p, 0], hf_cos[0, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(sin[p, 0], hf_sin[0, 0], rtol=0, atol=1e-5)
    # a whole prompt within the original context, on a fresh (stateless) transformers rotary
    hf_cos, _ = _hf(case)[1](x, torch.arange(16)[None])
    torch.testing.assert_close(cos[:16, 0], hf_cos[0], rtol=0, atol=1e-5)
    if case in ("dynamic", "longrope", "su"):  # past it the frequencies really switch
        plain = RotaryEmbedding(HEAD_DIM, theta=config.rope_theta)(torch.arange(POSITIONS), torch.float32)[0]
        if case == "dynamic":
            torch.testing.assert_close(cos[:16], plain[:16], rtol=0, atol=1e-5)
        assert not torch.allclose(cos[20:], plain[20:] * ours.attention_factor, atol=1e-3)


def test_static_scalings_change_the_frequencies():
    plain = RotaryEmbedding(HEAD_DIM, theta=10000.0)
    for case in ("linear", "llama3", "yarn"):
        config, _ = _hf(case)
        scaled = _ours(config)
        assert not torch.allclose(scaled.inv_freq_cpu, plain.inv_freq_cpu), case
    assert _ours(_hf("yarn")[0]).attention_factor > 1.0


def test_partial_rotary_leaves_the_tail_untouched():
    config, _ = _hf("longrope-partial")
    ours = _ours(config)
    cos, sin = ours(torch.arange(5), torch.float32)
    x = torch.randn(5, 2, HEAD_DIM)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 16:], x[..., 16:]) and not torch.allclose(y[..., :16], x[..., :16])


def test_unknown_scaling_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'ntk-by-parts'.*yarn"):
        RotaryEmbedding(HEAD_DIM, theta=1e4, scaling={"rope_type": "ntk-by-parts", "factor": 2.0})


# --- end to end: tiny random models through the runtime against transformers -----------------
from tests.runtime.models import family  # noqa: E402

_SMALL = dict(vocab_size=family.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
E2E = {  # name: (config, chat family)
    # Qwen2.5 long context: yarn over a 32-token original context, factor 4
    "qwen2-yarn": lambda: (transformers.Qwen2Config(
        **_SMALL, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1e6,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}), "chatml"),
    # dynamic NTK past max_position_embeddings = 40: prompts (<= 33) within it, decoding beyond
    "llama-dynamic": lambda: (transformers.LlamaConfig(
        **_SMALL, max_position_embeddings=40, tie_word_embeddings=False,
        rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "llama3"),
}


@pytest.mark.parametrize("case", list(E2E))
def test_scaled_rope_models_match_transformers(case, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config, chat = E2E[case]()
        folder, hf, _ = family.save_model(tmp_path, config, chat)
        runner = family.runner_for(folder)
        assert runner.model.rotary.kind == config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))
        family.check_logits(runner, hf, lengths=(20, 13))
        chat_ids = family.check_chat_template(runner, chat)
        family.check_generate(runner, hf, family.prompts_for(runner.tokenizer, chat_ids))
    finally:
        torch.set_num_threads(n)
