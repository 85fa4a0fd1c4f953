"""Mixtral, Qwen2-MoE and Qwen3-MoE against transformers on the same tiny random weights: each is
built with transformers' own classes (2 layers, 8 experts, top-2) and saved with a small BPE
tokenizer; sglite serves it through the Scheduler on the CPU (radix cache on, chunked prefill,
a ragged batch, one request reusing another's prefix) and must produce the greedy tokens of
`generate` for 32 steps with their logprobs, and logits within fp32 tolerance. With
TRITON_INTERPRET (the tests' default on a CPU) the experts run the Triton fused-MoE kernel."""

from __future__ import annotations

import pytest
import torch

from sglite.protocol import SamplingParams
from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.scheduler.req import Req
from sglite.runtime.scheduler.scheduler import Scheduler
from tests.runtime.scheduler.sinks import RecordingSink

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NUM_NEW = 32
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False)

CASES = {
    "mixtral": lambda vocab: transformers.MixtralConfig(
        **_SMALL, vocab_size=vocab, intermediate_size=48, num_local_experts=8,
        num_experts_per_tok=2),
    # shared expert + sigmoid gate, no top-k renormalisation, layer 1 dense
    "qwen2-moe": lambda vocab: transformers.Qwen2MoeConfig(
        **_SMALL, vocab_size=vocab, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, shared_expert_intermediate_size=48, norm_topk_prob=False,
        mlp_only_layers=[1]),
    # q/k norm, head_dim != hidden / heads, renormalised top-k
    "qwen3-moe": lambda vocab: transformers.Qwen3MoeConfig(
        **_SMALL, vocab_size=vocab, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the sun sets over the hills.",
    "Mixture of experts models route every token to a few experts out of many.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, in a village by the sea, there lived an old fisherman.",
]
PROMPTS = [
    "Once upon a time, in a village by the sea, there lived",
    "Once upon a time, in a village by the sea, there lived an old fisherman who",  # A's prefix
    "Mixture of experts",
    "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _save_tokenizer(folder) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module", params=list(CASES))
def moe_model(request, tmp_path_factory):
    """(folder, transformers model, tokenizer): random weights where every one counts."""
    folder = tmp_path_factory.mktemp(request.param)
    tok = _save_tokenizer(folder)
    config = CASES[request.param](len(tok))
    config._attn_implementation = "eager"
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return str(folder), model, tok


def _runner(folder, **kw):
    return ModelRunner(folder, dtype="float32", max_total_tokens=1024, max_running_requests=4, **kw)


def _submit(sched, ids, rid):
    params = SamplingParams(temperature=0, max_new_tokens=NUM_NEW, ignore_eos=True)
    req = Req(rid=rid, input_ids=ids, params=params, sink=RecordingSink(), return_logprob=True)
    sched.outputs.init_request(req)
    sched.add_request(req)
    return req


def _drain(sched):
    steps = 0
    while sched.has_work:
        sched.step()
        sched.cache.check_integrity()
        steps += 1
        assert steps < 500
    return steps


@torch.inference_mode()
def _hf_greedy(model, ids) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the logprob of each under its raw logits."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):]
    logprobs = torch.stack(out.logits)[:, 0].float().log_softmax(-1)  # [NUM_NEW, vocab]
    return tokens.tolist(), logprobs.gather(1, tokens[:, None])[:, 0]


def test_served_greedy_tokens_match_hf_generate(moe_model):
    folder, hf, tok = moe_model
    runner = _runner(folder)
    assert runner.model_config.num_experts == 8 and runner.tokenizer is not None
    sched = Scheduler(runner, chunked_prefill_size=16, max_running_requests=4, log_interval=0)
    seqs = [runner.tokenizer(p).input_ids for p in PROMPTS]
    assert max(len(s) for s in seqs) > 16  # the long prompts are prefilled in chunks
    first = _submit(sched, seqs[0], "first")
    while not first.output_ids:  # prefilled (in chunks): its prompt is in the radix tree
        sched.step()
    rest = [_submit(sched, s, f"r{i}") for i, s in enumerate(seqs[1:], 1)]  # a ragged batch
    _drain(sched)
    assert rest[0].num_cached_tokens >= len(seqs[0]) - 1  # reused the first request's KV
    for req, ids in zip([first, *rest], seqs):
        assert req.sink.error is None and req.sink.finished == 1
        ref_tokens, ref_logprobs = _hf_greedy(hf, ids)
        assert req.output_ids == ref_tokens, f"{req.rid}: {tok.decode(req.output_ids)!r}"
        served = torch.tensor([lp for lp, _, _ in req.logprobs["output_token_logprobs"]])
        torch.testing.assert_close(served, ref_logprobs, atol=1e-4, rtol=1e-4)
    assert sched.cache.flush()


def test_logits_match_hf_with_cached_prefix_and_decode(moe_model):
    """Prefix extend, a mixed extend on top of it, then decode steps: every logit matches
    transformers' full forward at the same position."""
    folder, hf, _ = moe_model
    runner = _runner(folder, skip_tokenizer_init=True)
    gen = torch.Generator().manual_seed(1)
    vocab = runner.model_config.vocab_size
    seqs = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (24, 15)]
    with torch.inference_mode():
        ref = [hf(torch.tensor([s])).logits[0].float() for s in seqs]
    rows = [runner.req_to_token.alloc() for _ in seqs]

    def extend(rows_, prefix_lens, new_ids):
        loc = runner.token_pool.alloc(sum(len(i) for i in new_ids))
        return runner.forward(runner.make_extend_batch(rows_, prefix_lens, new_ids, loc,
                                                       return_all_logits=True))

    extend(rows[:1], [0], [seqs[0][:5]])
    logits = extend(rows, [5, 0], [seqs[0][5:14], seqs[1][:10]])
    torch.testing.assert_close(logits[:9], ref[0][5:14], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[9:], ref[1][:10], atol=1e-4, rtol=1e-4)
    seq_lens = [14, 10]
    while seq_lens[1] < len(seqs[1]):
        last = [s[n] for s, n in zip(seqs, seq_lens)]
        seq_lens = [n + 1 for n in seq_lens]
        loc = runner.token_pool.alloc(2)
        logits = runner.forward(runner.make_decode_batch(rows, seq_lens, last, loc))
        expect = torch.stack([r[n - 1] for r, n in zip(ref, seq_lens)])
        torch.testing.assert_close(logits, expect, atol=1e-4, rtol=1e-4)


def test_mixtral_sliding_window_logits_match_hf(tmp_path):
    """Mixtral with a window smaller than the sequence: the MoE layers under windowed attention."""
    config = CASES["mixtral"](256)
    config.sliding_window, config._attn_implementation = 6, "eager"
    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    runner = _runner(str(tmp_path), skip_tokenizer_init=True)
    assert runner.model_config.sliding_window == 6
    ids = torch.randint(1, 256, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    loc = runner.token_pool.alloc(len(ids))
    batch = runner.make_extend_batch([runner.req_to_token.alloc()], [0], [ids], loc,
                                     return_all_logits=True)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(runner.forward(batch), ref, atol=1e-4, rtol=1e-4)


def test_config_reads_each_family_routing_rule():
    from sglite.runtime.models.config import ModelConfig

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=16)
    qwen2 = ModelConfig.from_hf_dict(dict(base, architectures=["Qwen2MoeForCausalLM"],
                                          decoder_sparse_step=2, mlp_only_layers=[3],
                                          shared_expert_intermediate_size=24))
    assert qwen2.moe_layers == (False, True, False, False)  # (i + 1) % 2 == 0, minus layer 3
    assert qwen2.attention_bias and not qwen2.norm_topk_prob and not qwen2.qk_norm
    assert qwen2.shared_expert_intermediate_size == 24
    qwen3 = ModelConfig.from_hf_dict(dict(base, architectures=["Qwen3MoeForCausalLM"],
                                          norm_topk_prob=True, shared_expert_intermediate_size=24))
    assert qwen3.moe_layers is None and qwen3.norm_topk_prob and qwen3.qk_norm
    assert not qwen3.attention_bias and qwen3.shared_expert_intermediate_size == 0
    mixtral = ModelConfig.from_hf_dict(dict(base, architectures=["MixtralForCausalLM"],
                                            num_local_experts=4, norm_topk_prob=False))
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob) == (4, 64, True)


def test_checkpoint_missing_an_expert_is_rejected():
    from sglite.runtime.models.layers.moe import stack_expert_weights

    w = torch.zeros(4, 8)
    names = [f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(2)
             for p in ("gate_proj", "up_proj", "down_proj")]
    stacked = dict(stack_expert_weights(((n, w) for n in names), 2))
    assert stacked["model.layers.0.mlp.experts.w13_weight"].shape == (2, 8, 8)
    assert stacked["model.layers.0.mlp.experts.w2_weight"].shape == (2, 4, 8)
    with pytest.raises(ValueError, match="lacks expert weights"):
        list(stack_expert_weights(((n, w) for n in names[:-1]), 2))
