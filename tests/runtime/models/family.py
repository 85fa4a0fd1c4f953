"""Shared by the model-family tests (issue 18): a tiny random model of the family built with
transformers' own classes and saved with a small trained tokenizer carrying the family's chat
template; then two checks against transformers on the same weights:

- check_logits: the ModelRunner on the CPU (a cached prefix, a ragged mixed extend on top of it,
  then decode steps one batch of different lengths) against transformers' full forward, every
  logit within fp32 tolerance;
- check_generate: the in-process Scheduler (radix prefix cache on, chunked prefill of a few
  tokens, a ragged batch whose requests share a prefix one earlier request cached) greedy for 32
  steps against `generate` per prompt: identical tokens, and each chosen token's logprob equal to
  log_softmax of generate's own step logits.
"""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 256
NEW_TOKENS = 32
_CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Write a short poem about the sea: the waves roll in and out again.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Question: what is two plus two? Answer: four. Question: name a color. Answer: blue.",
    "user model assistant system You are a helpful assistant. Hello! How are you today?",
]

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}"
    "<|end|>\n{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEMPLATES = {  # template, its special tokens (bos, eos, then markers)
    "gemma": (GEMMA_TEMPLATE, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "phi3": (PHI3_TEMPLATE, ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "chatml": (CHATML_TEMPLATE, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    "llama3": (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                 "<|end_header_id|>"]),
}
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}]


def save_tokenizer(folder, family: str):
    """A word-piece BPE trained on a few sentences (vocab < VOCAB) with the family's specials and
    chat template, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template, specials = TEMPLATES[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=["<unk>", *specials],
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB
    bos = specials[0] if family != "chatml" else None
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=specials[1],
        pad_token="<unk>", additional_special_tokens=specials[2:], chat_template=template)
    fast.save_pretrained(folder)
    return fast


def save_model(folder, config, family: str):
    """Random weights that all matter (HF init leaves norms at 1 / 0 and biases at 0), saved in
    fp32 with the tokenizer; returns (folder, the transformers model in eval mode, tokenizer)."""
    config._attn_implementation = "eager"  # soft-capping: sdpa would drop it
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok = save_tokenizer(folder, family)
    model.generation_config.eos_token_id = None  # 32 steps whatever comes, as ignore_eos
    model.generation_config.pad_token_id = 0
    return str(folder), model, tok


def runner_for(folder, **kw):
    from sglite.runtime.executor.model_runner import ModelRunner

    return ModelRunner(folder, dtype="float32", max_total_tokens=1024, max_running_requests=8,
                       max_context_len=128, **kw)


@torch.inference_mode()
def hf_logits(model, ids):
    return model(torch.tensor([ids])).logits[0].float()


def check_logits(runner, hf, *, lengths=(20, 13), atol=1e-4):
    """Prefix extend, a mixed ragged extend on top of it, then decode to the end of the shorter
    sequence: every logit against transformers' full forward at the same position."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    ref = [hf_logits(hf, s) for s in seqs]
    rows = [runner.req_to_token.alloc() for _ in seqs]

    def extend(rws, prefix_lens, new_ids, **kw):
        loc = runner.token_pool.alloc(sum(len(i) for i in new_ids))
        return runner.forward(runner.make_extend_batch(rws, prefix_lens, new_ids, loc, **kw))

    extend(rows[:1], [0], [seqs[0][:4]])
    prefix_lens, ext_lens = [4, 0], [8, 9]
    new_ids = [s[p : p + e] for s, p, e in zip(seqs, prefix_lens, ext_lens)]
    logits = extend(rows, prefix_lens, new_ids, return_all_logits=True)
    torch.testing.assert_close(logits[:8], ref[0][4:12], atol=atol, rtol=1e-4)
    torch.testing.assert_close(logits[8:], ref[1][:9], atol=atol, rtol=1e-4)
    seq_lens = [12, 9]
    while seq_lens[1] < len(seqs[1]):
        last = [s[n] for s, n in zip(seqs, seq_lens)]
        seq_lens = [n + 1 for n in seq_lens]
        loc = runner.token_pool.alloc(2)
        logits = runner.forward(runner.make_decode_batch(rows, seq_lens, last, loc))
        expect = torch.stack([r[n - 1] for r, n in zip(ref, seq_lens)])
        torch.testing.assert_close(logits, expect, atol=atol, rtol=1e-4)
    for row in rows:
        runner.req_to_token.free(row)
    runner.token_pool.reset()


class _Sink:
    def __init__(self):
        self.finished, self.error = 0, None

    def on_output(self, req, text, finished, meta):
        self.finished += int(finished)

    def on_error(self, req, message):
        self.error = message


def prompts_for(tok, chat_ids: list[int]) -> list[list[int]]:
    """The rendered chat, and a ragged batch sharing prefixes with it (and one that shares none)."""
    words = tok("Hello! How are you today? Write a short poem about the sea").input_ids
    return [chat_ids, chat_ids + words[:5], chat_ids[:9] + words[3:6], words[:7]]


def check_generate(runner, hf, prompts: list[list[int]], *, chunk=8, atol=1e-4):
    """prompts[0] alone first (its KV enters the radix tree), then the rest as one batch."""
    from sglite.protocol import SamplingParams
    from sglite.runtime.scheduler.req import Req
    from sglite.runtime.scheduler.scheduler import Scheduler

    sched = Scheduler(runner, chunked_prefill_size=chunk, max_running_requests=8, log_interval=0)
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = []

    def submit(i):
        req = Req(rid=f"r{i}", input_ids=list(prompts[i]), params=params, sink=_Sink(), return_logprob=True)
        sched.outputs.init_request(req)
        sched.add_request(req)
        reqs.append(req)

    submit(0)
    while sched.has_work:
        sched.step()
    for i in range(1, len(prompts)):
        submit(i)
    steps = 0
    while sched.has_work:
        sched.step()
        sched.cache.check_integrity()
        steps += 1
        assert steps < 1000
    assert sum(r.num_cached_tokens for r in reqs[1:]) >= len(prompts[0])  # the prefix cache served
    for req, ids in zip(reqs, prompts):
        assert req.sink.finished == 1 and req.sink.error is None, req.rid
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        ref = out.sequences[0, len(ids):].tolist()
        assert req.output_ids == ref, (req.rid, req.output_ids, ref)
        ours = [lp for lp, _, _ in req.logprobs["output_token_logprobs"]]
        theirs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ref)]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=atol, rtol=0)
    runner.token_pool.reset()
    return reqs


def check_chat_template(runner, family: str) -> list[int]:
    """The runtime's tokenizer carries the family's template from the folder; returns the ids of
    the rendered chat (a generation prompt)."""
    template, specials = TEMPLATES[family]
    tok = runner.tokenizer
    assert tok is not None and tok.chat_template == template
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for marker in specials[2:3]:
        assert marker in text, text
    ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    assert tok.convert_tokens_to_ids(specials[2]) in ids  # a marker is one special token
    return ids
