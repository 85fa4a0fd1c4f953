"""ScoreReq (`select`): prefill the shared prefix once, then score every choice in one batch.

Step 1 runs the prefix alone as a prefill-only request (max_new_tokens=0); when it finishes its KV
is in the radix tree. Step 2 submits one prefill-only request per choice (`text + choice`, with
input logprobs from max(P - 1, 1)) and, for unconditional scoring, one per choice's scored tokens
alone; they enter the scheduler together, so they run as one batched extend over the cached
prefix. The reply aligns token logprobs, ids and texts per choice (see protocol.ScoreReq).
"""

from __future__ import annotations

from sglite import protocol

_PREFILL_ONLY = protocol.SamplingParams(max_new_tokens=0)


def tokenize_choices(handler, text: str, choices: list[str]) -> tuple[list[int], list[list[int]]]:
    """The prefix's ids and each `text + choice`'s (tokenized whole: token healing at the
    boundary), in one batch call: the tokenizer's Rust side encodes the texts of a batch in
    parallel (a 20-shot select spent 2.1 of its 5.8 s tokenizing one text at a time, H200 host)."""
    texts = ([text] if text else []) + [text + c for c in choices]
    if handler.tokenizer is None:
        handler.tokenize(text)  # raises the no-tokenizer error
    bos = handler.tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))  # as handler.tokenize
    encoded = handler.tokenizer(texts, add_special_tokens=add_special).input_ids
    ids = [handler.prompt_ids(input_ids=e) for e in encoded]  # the length and vocabulary checks
    return (ids[0] if text else []), ids[1 if text else 0:]


class ScoreJob:
    def __init__(self, handler, identity: bytes, msg: protocol.ScoreReq,
                 tokenized: tuple[list[int], list[list[int]]]):
        """tokenized: tokenize_choices(handler, msg.text, msg.choices) (the handler may run it
        off the loop; it also refuses a select without choices, before tokenizing)."""
        self.handler, self.identity, self.rid, self.msg = handler, identity, msg.rid, msg
        self.on_done = lambda out: handler.server.send(identity, out)
        self.on_error = lambda m: handler.server.send(identity, protocol.ErrorOut(rid=msg.rid, message=m))
        self.group = msg.rid  # what an AbortReq names
        self.done = False
        self.prefix_ids, self.choice_ids = tokenized
        p = len(self.prefix_ids)
        self.starts = [min(max(p - 1, 1), len(ids) - 1) for ids in self.choice_ids]
        self.results: dict[tuple[str, int], object] = {}
        self.num_pending = 0
        if len(self.prefix_ids) > 1:
            self._submit(("prefix", 0), self.prefix_ids, start=-1)
        else:
            self._submit_choices()

    def abort(self) -> None:
        self.done = True
        self.handler.scheduler.abort(lambda r: r.client == self.identity and r.group == self.group)

    # ---- sink protocol for the internal requests
    def on_output(self, req, text: str, finished: bool, meta: dict) -> None:
        if not finished or self.done:
            return
        if meta["finish_reason"]["type"] == "abort":
            return self._fail(f"scoring was aborted: {meta['finish_reason']['matched']}")
        self.results[req.key] = req
        self.num_pending -= 1
        if req.key[0] == "prefix":
            self._submit_choices()
        elif self.num_pending == 0:
            self._finish()

    def on_error(self, req, message: str) -> None:
        self._fail(message)

    # ---- private
    def _submit(self, key, ids: list[int], *, start: int) -> None:
        h = self.handler
        req = h.make_req(f"{self.rid}/{key[0]}{key[1]}", ids, _PREFILL_ONLY, self,
                         client=self.identity, group=self.group, return_logprob=start >= 0,
                         logprob_start_len=start)
        req.key = key
        self.num_pending += 1
        h.scheduler.add_request(req)

    def _submit_choices(self) -> None:
        for i, ids in enumerate(self.choice_ids):
            self._submit(("choice", i), ids, start=self.starts[i])
        if self.msg.unconditional:
            for i, ids in enumerate(self.choice_ids):
                self._submit(("uncond", i), ids[self.starts[i]:], start=0)

    def _finish(self) -> None:
        self.done = True
        # the scored requests only: the prefix request's own hits are not part of these prompts
        scored = [r for key, r in self.results.items() if key[0] != "prefix"]
        prompt_tokens = sum(len(r.input_ids) for r in scored)
        cached = sum(min(r.num_cached_tokens, len(r.input_ids)) for r in scored)
        lps, ids, texts = [], [], []
        for i in range(len(self.choice_ids)):
            entries = self.results[("choice", i)].logprobs["input_token_logprobs"]
            lps.append([e[0] for e in entries])
            ids.append([e[1] for e in entries])
            texts.append([e[2] for e in entries])
        uncond = None
        if self.msg.unconditional:
            # the first token has no context: 0.0 (SGLang's None, which its methods count as 0)
            uncond = [[e[0] if e[0] is not None else 0.0
                       for e in self.results[("uncond", i)].logprobs["input_token_logprobs"]]
                      for i in range(len(self.choice_ids))]
        self.on_done(protocol.ScoreOut(
            rid=self.rid, token_logprobs=lps, token_ids=ids, token_texts=texts,
            unconditional_token_logprobs=uncond,
            meta_info={"prompt_tokens": prompt_tokens, "cached_tokens": cached}))

    def _fail(self, message: str) -> None:
        if not self.done:
            self.abort()
            self.on_error(message)
