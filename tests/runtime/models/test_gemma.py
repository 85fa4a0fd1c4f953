"""Gemma 2 and Gemma 3 (text) through the runtime on the CPU against transformers on the same tiny
random weights: embedding scale, (1 + w) sandwich norms, GeGLU, query_pre_attn_scalar, attention
and final-logit soft-capping (Gemma 2), q/k norms and the local rope base of the sliding layers
(Gemma 3), alternating sliding-window / global layers with a window smaller than the prompts."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.runtime.models import family

transformers = family.transformers

_SMALL = dict(vocab_size=family.VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gemma2():
    return transformers.Gemma2Config(**_SMALL, num_hidden_layers=4, query_pre_attn_scalar=24,
                                     attn_logit_softcapping=3.0, final_logit_softcapping=5.0)


def _gemma3():
    if not hasattr(transformers, "Gemma3ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma3ForCausalLM (needs >= 4.50)")
    return transformers.Gemma3TextConfig(
        **_SMALL, num_hidden_layers=4, query_pre_attn_scalar=24, rope_theta=1e6,
        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def served(request, tmp_path_factory):
    config = {"gemma2": _gemma2, "gemma3": _gemma3}[request.param]()
    folder, hf, _ = family.save_model(tmp_path_factory.mktemp(request.param), config, "gemma")
    return request.param, family.runner_for(folder), hf


def test_config_reads_the_family(served):
    name, runner, hf = served
    cfg = runner.model_config
    assert cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.attention_scale == 24**-0.5
    layers = [cfg.window_for_layer(i) for i in range(cfg.num_layers)]
    if name == "gemma2":
        assert layers == [5, None, 5, None] and cfg.attn_logit_softcapping == 3.0
        assert cfg.final_logit_softcapping == 5.0 and not cfg.qk_norm
    else:
        assert layers == [5, 5, None, 5] and cfg.qk_norm and cfg.rope_local_theta == 100.0
        assert cfg.attn_logit_softcapping is None
    assert not cfg.is_all_windowed  # global layers keep every key: no window freeing


def test_logits_match_transformers(served):
    _, runner, hf = served
    family.check_logits(runner, hf)


def test_greedy_32_steps_match_generate(served):
    _, runner, hf = served
    chat_ids = family.check_chat_template(runner, "gemma")
    family.check_generate(runner, hf, family.prompts_for(runner.tokenizer, chat_ids))


def test_gemma2_through_the_triton_kernels(tmp_path, monkeypatch):
    """The GPU path's attention (soft-capped decode / extend kernels, per-layer windows), its
    norms (each sandwich pair in one launch), rotary kernel, scaled embedding with cos / sin in
    one launch and final soft-cap in one, here under the Triton interpreter, against
    transformers."""
    from sglite.runtime.models import gemma
    from sglite.runtime.models.layers import rotary

    monkeypatch.setattr(gemma, "use_fused", lambda t: True)
    monkeypatch.setattr(rotary, "use_fused", lambda t: True)
    calls = []
    for module, name in (("embed_rope", "embed_rope"), ("softcap", "softcap_logits")):
        mod = importlib.import_module(f"sglite.kernels.{module}")
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    folder, hf, _ = family.save_model(tmp_path, _gemma2(), "gemma")
    runner = family.runner_for(folder, attention_backend="triton", skip_tokenizer_init=True)
    family.check_logits(runner, hf, lengths=(16, 11))
    assert "embed_rope" in calls and "softcap_logits" in calls


def test_gemma_norm_fused_path_matches_torch(monkeypatch):
    """GemmaRMSNorm's CUDA path (the fused norm kernels with 1 + w, here interpreted) against its
    torch path, alone and with the residual add, on fp32 rows."""
    from sglite.runtime.models import gemma

    norm = gemma.GemmaRMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    norm.refresh_fused()
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
    ref, (ref_a, ref_r) = norm(x), norm(x, r)
    monkeypatch.setattr(gemma, "use_fused", lambda t: True)
    out = norm(x.clone())
    out_a, out_r = norm(x.clone(), r.clone())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_a, ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_r, ref_r)


def test_gemma_sandwich_pair_fused_matches_torch(monkeypatch):
    """then_add_norm (a post-norm, the residual add and the next pre-norm) in one interpreted
    launch against the torch path on fp32 rows, in place on x and the residual."""
    from sglite.runtime.models import gemma

    post, pre = gemma.GemmaRMSNorm(48, 1e-6), gemma.GemmaRMSNorm(48, 1e-5)
    with torch.no_grad():
        post.weight.normal_(0, 0.3)
        pre.weight.normal_(0, 0.3)
    post.refresh_fused()
    pre.refresh_fused()
    gen = torch.Generator().manual_seed(1)
    x, r = torch.randn(3, 48, generator=gen) * 4, torch.randn(3, 48, generator=gen)
    ref_x, ref_r = post.then_add_norm(x.clone(), r.clone(), pre)
    monkeypatch.setattr(gemma, "use_fused", lambda t: True)
    xx, rr = x.clone(), r.clone()
    out_x, out_r = post.then_add_norm(xx, rr, pre)
    assert out_x.data_ptr() == xx.data_ptr() and out_r.data_ptr() == rr.data_ptr()
    torch.testing.assert_close(out_x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_r, ref_r, atol=1e-5, rtol=1e-5)


def test_gemma2_with_the_one_row_gemv(tmp_path, monkeypatch):
    """Gemma's decoder projections through the one-row GEMV kernel (batch-1 decode rows,
    interpreted; gemv.use_gemv forced for CPU tensors) against transformers' logits."""
    from sglite.kernels import gemv

    folder, hf, _ = family.save_model(tmp_path, _gemma2(), "gemma")
    runner = family.runner_for(folder, attention_backend="triton", skip_tokenizer_init=True)
    rows_seen = []

    def use(x, w, b):
        rows_seen.append(x.shape[0])
        return b is None and x.dim() == 2 and x.shape[0] == 1

    monkeypatch.setattr(gemv, "use_gemv", use)
    seq = torch.randint(3, family.VOCAB, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = family.hf_logits(hf, seq)
    row = runner.req_to_token.alloc()
    loc = runner.token_pool.alloc(12)
    logits = runner.forward(runner.make_extend_batch([row], [0], [seq[:12]], loc))
    torch.testing.assert_close(logits[0], ref[11], atol=1e-4, rtol=1e-4)
    for n in range(12, 16):
        logits = runner.forward(runner.make_decode_batch([row], [n + 1], [seq[n]], runner.token_pool.alloc(1)))
        torch.testing.assert_close(logits[0], ref[n], atol=1e-4, rtol=1e-4)
    assert rows_seen.count(1) == 4 * 4 * 4  # every projection of every decode step took the kernel


@pytest.mark.parametrize("norm_inside", [True, False])
def test_gemma2_paired_gemvs_with_their_epilogues(tmp_path, monkeypatch, norm_inside):
    """Batch-1 decode's qkv projection, rotary and KV store in one launch (gemv_pairs.gemv_rope)
    and gate_up with GeGLU in one (gemv_glu), with or without the sandwich norm pair before each
    inside it (NORM), interpreted (gemv.use_gemv and the fused rotary layout forced for CPU
    tensors), against transformers' logits; the extend before them rotates and stores through
    the rotary kernel."""
    from sglite.kernels import gemv, gemv_pairs
    from sglite.runtime.models import gemma
    from sglite.runtime.models.layers import rotary

    folder, hf, _ = family.save_model(tmp_path, _gemma2(), "gemma")
    runner = family.runner_for(folder, attention_backend="triton", skip_tokenizer_init=True)
    monkeypatch.setattr(gemv, "use_gemv", lambda x, w, b: b is None and x.dim() == 2 and x.shape[0] == 1)
    monkeypatch.setattr(rotary, "use_fused", lambda t: True)
    monkeypatch.setattr(gemv_pairs, "NORM", norm_inside)
    for module in runner.model.modules():  # the CUDA norms' 1 + w (refreshed only where fused)
        if isinstance(module, gemma.GemmaRMSNorm):
            module.refresh_fused()
    calls = []
    for name in ("gemv_rope", "gemv_glu"):
        real = getattr(gemv_pairs, name)
        monkeypatch.setattr(gemv_pairs, name, lambda *a, _f=real, _n=name, **kw:
                            calls.append((_n, kw.get("norm") is not None)) or _f(*a, **kw))
    seq = torch.randint(3, family.VOCAB, (16,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = family.hf_logits(hf, seq)
    row = runner.req_to_token.alloc()
    logits = runner.forward(runner.make_extend_batch([row], [0], [seq[:12]], runner.token_pool.alloc(12)))
    torch.testing.assert_close(logits[0], ref[11], atol=1e-4, rtol=1e-4)
    assert not calls
    for n in range(12, 14):  # two decode steps (interpreted: ~25 s a step for both variants)
        logits = runner.forward(runner.make_decode_batch([row], [n + 1], [seq[n]], runner.token_pool.alloc(1)))
        torch.testing.assert_close(logits[0], ref[n], atol=1e-4, rtol=1e-4)
    # every layer (4) of every decode step (2), both; the norm pairs inside all but the first
    # layer's qkv
    assert [n for n, _ in calls].count("gemv_rope") == [n for n, _ in calls].count("gemv_glu") == 4 * 2
    assert calls.count(("gemv_rope", True)) == (3 * 2 if norm_inside else 0)
    assert calls.count(("gemv_glu", True)) == (4 * 2 if norm_inside else 0)


def test_set_one_row_gemv_on_a_subset(tmp_path):
    """set_one_row_gemv(which=...): the named projections are flagged for the GEMV, the others go
    back to cuBLAS, and a second call with another subset replaces the first."""
    from sglite.runtime.models import gemma

    folder, _, _ = family.save_model(tmp_path, _gemma2(), "gemma")
    runner = family.runner_for(folder, attention_backend="triton", skip_tokenizer_init=True)
    layers = runner.model.model.layers

    def which():
        out = set()
        for layer in layers:
            lins = dict(qkv=layer.self_attn.qkv_proj, o=layer.self_attn.o_proj,
                        gate_up=layer.mlp.gate_up_proj, down=layer.mlp.down_proj)
            out |= {name for name, lin in lins.items() if lin.one_row_gemv}
        return out

    assert which() == set(gemma.GEMV_PROJECTIONS)  # as built
    assert gemma.set_one_row_gemv(runner.model, ("o", "gate_up")) == 2 * len(layers)
    assert which() == {"o", "gate_up"}
    assert gemma.set_one_row_gemv(runner.model, ("down",)) == len(layers)
    assert which() == {"down"}
    with pytest.raises(ValueError):
        gemma.set_one_row_gemv(runner.model, ("lm_head",))
