"""FP8 weights on the CPU reference path: the quantizer's error bound, online quantization of a
model, FP8 checkpoints (per-tensor and per-channel scales) loaded as published, and the FP8 KV
pool's capacity and accuracy."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.models.layers.linear import MergedLinear, QuantLinear
from sglite.runtime.models.quant.fp8 import FP8_DTYPE, dequantize, quantize_per_channel

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def test_per_channel_quantization_error_bound():
    gen = torch.Generator().manual_seed(0)
    # rows of very different magnitudes: one scale per output channel keeps each row's precision
    w = torch.randn(64, 96, generator=gen) * torch.logspace(-3, 2, 64)[:, None]
    q, scale = quantize_per_channel(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (64,)
    # each row's amax lands in (224, 448] (the scale searched over one binade of the grid)
    amax = q.float().abs().amax(1)
    assert (amax <= 448.0).all() and (amax > 224.0).all()
    err = (dequantize(q, scale, torch.float32) - w).abs()
    # e4m3: half an ulp is 2^-4 relative for normals; below 2^-6 * scale the step is 2^-9 * scale
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-6)
    assert (err <= bound).all()
    x = torch.randn(8, 96, generator=gen)
    ref = x @ w.T
    out = x @ dequantize(q, scale, torch.float32).T
    channel_err = (out - ref).norm(dim=0) / ref.norm(dim=0)  # ~2^-4 / sqrt(3) rms relative
    assert channel_err.mean() < 0.03 and channel_err.max() < 0.08


def test_per_channel_scale_search_beats_amax_scaling():
    """Every row's squared error at most amax -> 448's (a candidate), and less on the whole."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=gen) * torch.logspace(-2, 1, 128)[:, None]
    q, scale = quantize_per_channel(w)
    amax_scale = w.abs().amax(1) / 448.0
    plain = (w / amax_scale[:, None]).to(FP8_DTYPE).float() * amax_scale[:, None]
    err = (dequantize(q, scale, torch.float32) - w).square().sum(1)
    err_plain = (plain - w).square().sum(1)
    assert (err <= err_plain * (1 + 1e-6)).all()
    assert err.sum() < 0.95 * err_plain.sum()


def _logits(runner, ids):
    loc = runner.token_pool.alloc(len(ids))
    batch = runner.make_extend_batch([runner.req_to_token.alloc()], [0], [ids], loc, return_all_logits=True)
    return runner.forward(batch)


def _kl(ref_logits, logits):
    return F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean").item()


def test_online_fp8_quantizes_the_projections_only():
    kw = dict(load_format="dummy", preset="tiny", dtype="float32", max_total_tokens=256, seed=5,
              config_overrides=dict(tie_word_embeddings=False))
    base, fp8 = ModelRunner(**kw), ModelRunner(quantization="fp8", **kw)
    layer = fp8.model.model.layers[0]
    for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(proj, (MergedLinear, QuantLinear)) and proj.weight.dtype == FP8_DTYPE
        assert proj.weight_scale.shape == (proj.weight.shape[0],)
    assert fp8.model.lm_head.weight.dtype == torch.float32  # the logits stay unquantized
    assert fp8.model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, out = _logits(base, ids), _logits(fp8, ids)
    assert 0 < _kl(ref, out) < 0.01  # quantized (not equal), and close


def _tiny_llama_folder(path):
    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _write_fp8_checkpoint(src, dst):
    """src's weights as an FP8 checkpoint: attention projections with per-tensor scales, MLP with
    per-channel [N, 1] scales, q_proj of layer 1 left in fp32 (a mixed checkpoint); and a
    dequantized fp32 copy of the same numbers in dst / "deq"."""
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for name, t in tensors.items():
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if proj in ("q_proj", "k_proj", "v_proj", "o_proj") and name != "model.layers.1.self_attn.q_proj.weight":
            scale = t.abs().max() / 448.0
            q = (t / scale).to(FP8_DTYPE)
            fp8[name], fp8[name + "_scale"] = q, scale.reshape(())
            fp8[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)  # static: ignored
            deq[name] = q.float() * scale
        elif proj in ("gate_proj", "up_proj", "down_proj"):
            q, scale = quantize_per_channel(t)
            fp8[name], fp8[name + "_scale"] = q, scale[:, None]
            deq[name] = dequantize(q, scale, torch.float32)
        else:
            fp8[name] = deq[name] = t
    config = json.loads((src / "config.json").read_text())
    for folder, weights, extra in ((dst, fp8, {"quantization_config": {"quant_method": "fp8",
                                                                      "activation_scheme": "static"}}),
                                   (dst / "deq", deq, {})):
        folder.mkdir(parents=True, exist_ok=True)
        safetensors_torch.save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
    return fp8


def test_fp8_checkpoint_loads_as_published(tmp_path):
    src = _tiny_llama_folder(tmp_path / "src")
    published = _write_fp8_checkpoint(src, tmp_path / "fp8")
    kw = dict(dtype="float32", max_total_tokens=256, skip_tokenizer_init=True)
    runner = ModelRunner(str(tmp_path / "fp8"), **kw)  # FP8 from the checkpoint's own config
    assert runner.quantization == "fp8"
    attn = runner.model.model.layers[0].self_attn
    q_size = 4 * 16
    # the published bytes, not a requantization; per-tensor scales repeated over each shard's rows
    assert torch.equal(attn.qkv_proj.weight[:q_size].view(torch.uint8),
                       published["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8))
    assert torch.equal(attn.o_proj.weight.view(torch.uint8),
                       published["model.layers.0.self_attn.o_proj.weight"].view(torch.uint8))
    k_scale = published["model.layers.0.self_attn.k_proj.weight_scale"]
    assert torch.equal(attn.qkv_proj.weight_scale[q_size : q_size + 32], k_scale.expand(32))
    mlp = runner.model.model.layers[0].mlp
    assert torch.equal(mlp.down_proj.weight_scale, published["model.layers.0.mlp.down_proj.weight_scale"][:, 0])
    # the unquantized q_proj of layer 1 was quantized on load
    assert runner.model.model.layers[1].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    # same function as the dequantized fp32 checkpoint (layer 1's q_proj: within FP8 rounding)
    ids = torch.randint(0, 384, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = _logits(ModelRunner(str(tmp_path / "fp8" / "deq"), **kw), ids)
    assert _kl(ref, _logits(runner, ids)) < 1e-3
    with pytest.raises(ValueError, match="lacks the weight_scale"):
        tensors = safetensors_torch.load_file(str(tmp_path / "fp8" / "model.safetensors"))
        del tensors["model.layers.0.mlp.up_proj.weight_scale"]
        safetensors_torch.save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
        ModelRunner(str(tmp_path / "fp8"), **kw)


def test_fp8_kv_pool_holds_twice_the_tokens_and_decodes_close():
    kw = dict(load_format="dummy", preset="tiny", dtype="bfloat16", kv_memory_bytes=1 << 20, seed=7)
    base, fp8 = ModelRunner(**kw), ModelRunner(kv_cache_dtype="fp8_e4m3", **kw)
    assert fp8.kv_cache.k_buffers[0].dtype == FP8_DTYPE
    assert fp8.kv_cache.bytes_per_token * 2 == base.kv_cache.bytes_per_token
    assert fp8.kv_cache.num_slots == 2 * base.kv_cache.num_slots  # same memory, twice the slots
    assert fp8.kv_cache.total_bytes == base.kv_cache.total_bytes
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    for runner in (base, fp8):  # a prefix in the pool, then decode steps reading it
        row = runner.req_to_token.alloc()
        runner.forward(runner.make_extend_batch([row], [0], [ids], runner.token_pool.alloc(30)))
        runner.row = row
    for step in range(3):
        seq_len = 31 + step
        outs = [r.forward_decode([r.row], [seq_len], [ids[step]], r.token_pool.alloc(1))[0] for r in (base, fp8)]
        assert 0 < _kl(outs[0].float(), outs[1].float()) < 0.01


def test_fp8_kv_triton_backend_matches_torch_backend():
    """The Triton backend over an FP8 pool (store_kv quantizing, kernels reading FP8; interpreted
    here, fp16 because the interpreter's bf16 dots are wrong) against the torch backend's gather.
    Extends differ by design within FP8 rounding (Triton attends the new tokens' unquantized K/V,
    torch reads them back from the pool); a decode over the same pool contents must agree."""
    kw = dict(load_format="dummy", preset="tiny", dtype="float16", max_total_tokens=128, seed=9,
              kv_cache_dtype="fp8_e4m3")
    runners = [ModelRunner(attention_backend=name, **kw) for name in ("torch", "triton")]
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    extends = []
    for runner in runners:
        row = runner.req_to_token.alloc()
        runner.forward(runner.make_extend_batch([row], [0], [ids[:12]], runner.token_pool.alloc(12)))
        extends.append(runner.forward(runner.make_extend_batch([row], [12], [ids[12:]], runner.token_pool.alloc(8),
                                                               return_all_logits=True)).float())
        runner.row = row
    assert rel(extends[1], extends[0]) < 0.05
    torch_kv, triton_kv = runners[0].kv_cache, runners[1].kv_cache
    assert torch.equal(runners[0].req_to_token.table[:, :20], runners[1].req_to_token.table[:, :20])
    stored = runners[1].req_to_token.table[runners[1].row, :20].long()
    assert triton_kv.k_buffers[0][stored].float().abs().min(-1).values.sum() > 0  # written by store_kv
    for i in range(triton_kv.num_buffers):  # the same FP8 pool under both
        triton_kv.k_buffers[i].copy_(torch_kv.k_buffers[i])
        triton_kv.v_buffers[i].copy_(torch_kv.v_buffers[i])
    decoded = [r.forward_decode([r.row], [21], [ids[0]], r.token_pool.alloc(1))[0].float() for r in runners]
    assert rel(decoded[1], decoded[0]) < 3e-3


def rel(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()
