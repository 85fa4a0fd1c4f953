"""sglite's executor against transformers on the same weights: the embedded SmolLM2 (fp32), and
tiny random Qwen2 / Qwen3 / Mistral (sliding window) models written with save_pretrained."""

from __future__ import annotations

import pytest
import torch

from sglite.runtime.models.loader import resolve_model
from sglite.runtime.executor.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")


def extend(runner, rows, prefix_lens, new_ids, *, return_all_logits=False):
    loc = runner.token_pool.alloc(sum(len(ids) for ids in new_ids))
    batch = runner.make_extend_batch(rows, prefix_lens, new_ids, loc, return_all_logits=return_all_logits)
    return runner.forward(batch)


def decode(runner, rows, seq_lens, last_ids):
    loc = runner.token_pool.alloc(len(rows))
    return runner.forward(runner.make_decode_batch(rows, seq_lens, last_ids, loc))


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # [len, vocab]


# --- SmolLM2, the embedded default ------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    folder = resolve_model(None)
    runner = ModelRunner(folder, dtype="float32", max_total_tokens=4096, max_running_requests=8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return runner, hf


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "1, 2, 3, 4, 5,",
]


def test_smollm_extend_with_cached_prefix_matches_hf(smollm):
    runner, hf = smollm
    tok = runner.tokenizer
    seqs = [tok(p).input_ids for p in PROMPTS]
    rows = [runner.req_to_token.alloc() for _ in seqs]
    # requests 0 and 2 first extend a prefix; then one mixed batch extends all four
    prefix_lens = [3, 0, 7, 0]
    extend(runner, [rows[0], rows[2]], [0, 0], [seqs[0][:3], seqs[2][:7]])
    new_ids = [s[p:] for s, p in zip(seqs, prefix_lens)]
    logits = extend(runner, rows, prefix_lens, new_ids, return_all_logits=True)
    start, max_diff = 0, 0.0
    for seq, prefix_len, ids in zip(seqs, prefix_lens, new_ids):
        ref = hf_logits(hf, seq)[prefix_len:]
        max_diff = max(max_diff, (logits[start : start + len(ids)] - ref).abs().max().item())
        start += len(ids)
    print(f"SmolLM2 fp32 max |logit diff| vs transformers: {max_diff:.2e}")
    assert max_diff < 2e-3
    for row in rows:
        runner.req_to_token.free(row)


def test_smollm_greedy_32_tokens_match_hf_generate(smollm):
    runner, hf = smollm
    tok = runner.tokenizer
    seqs = [tok(p).input_ids for p in PROMPTS[:3]]
    rows = [runner.req_to_token.alloc() for _ in seqs]
    logits = extend(runner, rows, [0] * len(seqs), seqs)
    outs = [[] for _ in seqs]
    for _ in range(32):
        next_ids = logits.argmax(-1).tolist()
        for out, t in zip(outs, next_ids):
            out.append(t)
        seq_lens = [len(s) + len(o) for s, o in zip(seqs, outs)]
        logits = decode(runner, rows, seq_lens, next_ids)  # one batch, different lengths
    for seq, out in zip(seqs, outs):
        ref = hf.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                          max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        ref_out = ref[0, len(seq):].tolist()  # generate stops after EOS; our loop does not
        assert len(ref_out) >= 16 and out[: len(ref_out)] == ref_out, tok.decode(out)
    for row in rows:
        runner.req_to_token.free(row)


# --- tiny random models of other architectures ------------------------------------------------
def _save_random_hf_model(tmp_path, config) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF init leaves biases at 0 and norms at 1; make every weight count
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return str(tmp_path), model


_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=256)

ARCH_CASES = {
    "qwen2-bias": lambda: transformers.Qwen2Config(**_SMALL, num_key_value_heads=2,
                                                   tie_word_embeddings=False),
    "qwen2-window-layers": lambda: transformers.Qwen2Config(
        **_SMALL, num_key_value_heads=1, use_sliding_window=True, sliding_window=5,
        max_window_layers=1, tie_word_embeddings=True),
    "qwen3-qknorm-headdim": lambda: transformers.Qwen3Config(
        **_SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "mistral-window": lambda: transformers.MistralConfig(
        **_SMALL, num_key_value_heads=2, sliding_window=6, tie_word_embeddings=False),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        **_SMALL, num_key_value_heads=4, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_tiny_architectures_match_hf(tmp_path, case):
    """Prefix extend, a mixed extend on top of it, then decode past any window: every logit
    must match transformers' full forward at the same position."""
    hf_config = ARCH_CASES[case]()
    hf_config._attn_implementation = "eager"
    folder, hf = _save_random_hf_model(tmp_path, hf_config)
    runner = ModelRunner(folder, dtype="float32", max_total_tokens=512, max_running_requests=4,
                         skip_tokenizer_init=True)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (20, 13)]
    ref = [hf_logits(hf, s) for s in seqs]
    rows = [runner.req_to_token.alloc() for _ in seqs]
    extend(runner, rows[:1], [0], [seqs[0][:4]])
    prefix_lens, ext_lens = [4, 0], [8, 9]
    new_ids = [s[p : p + e] for s, p, e in zip(seqs, prefix_lens, ext_lens)]
    logits = extend(runner, rows, prefix_lens, new_ids, return_all_logits=True)
    torch.testing.assert_close(logits[:8], ref[0][4:12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[8:], ref[1][:9], atol=1e-4, rtol=1e-4)
    seq_lens = [12, 9]
    while seq_lens[1] < len(seqs[1]):
        last = [s[n] for s, n in zip(seqs, seq_lens)]
        seq_lens = [n + 1 for n in seq_lens]
        logits = decode(runner, rows, seq_lens, last)
        expect = torch.stack([r[n - 1] for r, n in zip(ref, seq_lens)])
        torch.testing.assert_close(logits, expect, atol=1e-4, rtol=1e-4)
