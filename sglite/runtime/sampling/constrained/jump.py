"""Jump-forward decoding (the compressed FSM of the SGLang paper) with re-tokenization.

Where the grammar admits exactly one continuation string (`{"name": "` at the start of a JSON
object with fixed keys, `", "age": ` between fields, closing brackets), the runtime appends it
without a decode step per token. Appending the forced text's own tokens after the last sampled
token would give a token boundary the tokenizer never produces (`"` + `,` where the tokenizer has
`",`), which the model has never seen in training and which hurts what it generates next. So, as
in SGLang, the tail is re-tokenized: the text of the last few output tokens plus the forced string
is encoded again, the tokens that changed are dropped (the matcher is rolled back past them) and
the new ones are accepted.

Scheduler integration (per constrained request, after it accepted its sampled token):

    jf = jump_forward(req.grammar, tokenizer, req.output_ids)
    if jf is not None:
        # the matcher already accepted jf.new_token_ids
        del req.output_ids[len(req.output_ids) - jf.num_dropped:]
        req.output_ids += jf.new_token_ids
        # KV: positions whose KV exists and whose token was dropped are freed; every token from
        # min(kv_len, new_len_before_append) on is prefilled as an *extend* (the last sampled
        # token has no KV yet in a decode loop, so it is part of that extend when not dropped).
        # The extend's last logits give the next token, masked by req.grammar as usual.
        # Text: the visible text grows by exactly jf.text (the dropped tokens' text is a prefix of
        # the new tokens' text), so emit jf.text and restart the incremental detokenizer from the
        # new ids. meta_info["jump_forward_tokens"] += jf.num_jumped.

Correctness (checked here, not assumed): bytes(kept tokens + new tokens) == bytes(old tokens) +
forced text, and the matcher accepted every new token; otherwise the state is restored and None
is returned (the request just decodes normally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sglite.runtime.sampling.constrained.state import GrammarState


@dataclass(frozen=True)
class JumpForward:
    num_dropped: int  # trailing output tokens to remove (the matcher is already rolled back)
    new_token_ids: list[int]  # tokens to append (already accepted by the matcher)
    text: str  # the forced string: the text that the new tokens add

    @property
    def num_jumped(self) -> int:
        """Tokens gained without a decode step (for meta_info)."""
        return len(self.new_token_ids) - self.num_dropped


def jump_forward(
    state: GrammarState,
    tokenizer: Any,
    output_ids: Sequence[int],
    *,
    window: int = 4,
    min_tokens: int = 1,
) -> JumpForward | None:
    """Append the grammar's forced continuation of `output_ids` (the tokens `state` accepted).

    `window`: how many trailing tokens may be re-tokenized together with the forced text (widened
    to a UTF-8 character boundary). `min_tokens` > 1: jump only if it gains at least this many
    tokens (the forced text's byte length bounds that, checked first); 1 also takes jumps that
    only re-tokenize. None (state unchanged) when
    nothing is forced, the gain is smaller, or re-tokenization fails."""
    forced = state.jump_forward_text()
    if not forced or len(forced.encode("utf-8")) < min_tokens:
        return None
    if len(output_ids) > state.num_accepted:
        raise ValueError(
            f"output_ids has {len(output_ids)} tokens but the grammar accepted {state.num_accepted}"
        )
    table = state.compiled.token_bytes
    start = _utf8_boundary(table, output_ids, max(0, len(output_ids) - window))
    if start is None:
        return None
    old_tail = [int(t) for t in output_ids[start:]]
    tail_bytes = b"".join(table[t] for t in old_tail)
    target = tail_bytes + forced.encode("utf-8")
    new_tail = tokenizer.encode(tail_bytes.decode("utf-8") + forced, add_special_tokens=False)
    if b"".join(table[t] for t in new_tail) != target:
        # The tokenizer did not round-trip the text (special-token strings, normalization): fall
        # back to the forced text's own tokens after the unchanged tail.
        new_tail = old_tail + tokenizer.encode(forced, add_special_tokens=False)
        if b"".join(table[t] for t in new_tail) != target:
            return None
    if min_tokens > 1 and len(new_tail) - len(old_tail) < min_tokens:
        return None
    keep = _common_prefix_len(old_tail, new_tail)
    num_dropped = len(old_tail) - keep
    state.rollback(num_dropped)
    if not state.accept_many(new_tail[keep:]):
        restored = state.accept_many(old_tail[keep:])
        assert restored, "re-accepting previously accepted tokens failed"
        return None
    return JumpForward(num_dropped=num_dropped, new_token_ids=new_tail[keep:], text=forced)


def _utf8_boundary(table: list[bytes], ids: Sequence[int], start: int) -> int | None:
    """Move `start` back until ids[start:] decodes as UTF-8 (a character may span tokens)."""
    for s in range(start, -1, -1):
        try:
            b"".join(table[t] for t in ids[s:]).decode("utf-8")
            return s
        except UnicodeDecodeError:
            continue
    return None


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
