"""SGLang's three ways to pick a `select` choice from per-token logprobs (pure Python).

Used by the frontend (`select` over ScoreReq/ScoreOut); it imports nothing but the standard
library, so the frontend stays free of torch.

Token logprobs come per choice as SGLang's `(logprob, token_id, text)` tuples. `decide` is the
entry point the interpreter calls with a ScoreOut's lists: it drops the boundary token when the
prefix text already ends with that token's text (no token healing happened, so the token belongs
to the prefix, not to the choice), averages the rest, and applies the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

TokenLogprob = tuple  # (logprob: float | None, token_id: int, text: str)


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


class ChoicesSamplingMethod:
    """Callable with SGLang's keyword signature; `name` identifies the method."""

    name = ""
    requires_unconditional_logprobs = False

    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[TokenLogprob]],
                 output_token_logprobs: list[list[TokenLogprob]],
                 unconditional_token_logprobs: list[list[TokenLogprob]] | None = None,
                 ) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _base_meta(normalized, input_lps, output_lps) -> dict[str, Any]:
    return {"normalized_prompt_logprobs": normalized, "input_token_logprobs": input_lps,
            "output_token_logprobs": output_lps}


def _argmax(values: Sequence[float]) -> int:
    # First index wins ties, as numpy.argmax does in SGLang.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


class TokenLengthNormalized(ChoicesSamplingMethod):
    """Argmax of the mean token logprob of each choice (SGLang's default)."""

    name = "token_length_normalized"

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 output_token_logprobs, unconditional_token_logprobs=None):
        best = choices[_argmax(normalized_prompt_logprobs)]
        return ChoicesDecision(best, _base_meta(normalized_prompt_logprobs, input_token_logprobs,
                                                output_token_logprobs))


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Token-by-token elimination: keep the choices with the best logprob at position j, then j+1...

    Shorter choices are padded with their own average logprob (SGLang's rule), so a short choice
    neither wins nor loses just by ending early."""

    name = "greedy_token_selection"

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 output_token_logprobs, unconditional_token_logprobs=None):
        max_len = max(len(option) for option in input_token_logprobs)
        matrix = []  # [num_choices][max_len]
        for option in input_token_logprobs:
            row = [lp[0] for lp in option]
            matrix.append(row + [_mean(row)] * (max_len - len(row)))
        remaining = list(range(len(choices)))
        for j in range(max_len):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["greedy_logprob_matrix"] = matrix
        return ChoicesDecision(choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Argmax of mean(conditional logprob - unconditional logprob): favours choices that the
    context makes likelier, not choices that are likely anyway. The first unconditional token has
    no context (None); it counts as 0, as in SGLang."""

    name = "unconditional_likelihood_normalized"
    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 output_token_logprobs, unconditional_token_logprobs=None):
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional_token_logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            # mean(a - b) == mean(a) - mean(b) for equal lengths; this form also tolerates a
            # healed boundary token that makes the two lists differ by one.
            scores.append(_mean([lp[0] for lp in cond]) - _mean([lp[0] or 0.0 for lp in uncond]))
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["unconditional_token_logprobs"] = unconditional_token_logprobs
        meta["normalized_unconditional_prompt_logprobs"] = scores
        return ChoicesDecision(choices[_argmax(scores)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
CHOICES_METHODS = {m.name: m for m in (token_length_normalized, greedy_token_selection,
                                       unconditional_likelihood_normalized)}


def get_choices_method(method: str | ChoicesSamplingMethod) -> ChoicesSamplingMethod:
    if isinstance(method, ChoicesSamplingMethod):
        return method
    if method not in CHOICES_METHODS:
        raise ValueError(f"unknown choices_method {method!r}; expected one of {sorted(CHOICES_METHODS)}")
    return CHOICES_METHODS[method]


def decide(method: str | ChoicesSamplingMethod, *, prefix_text: str, choices: list[str],
           token_logprobs: list[list[float]], token_ids: list[list[int]],
           token_texts: list[list[str]],
           unconditional_token_logprobs: list[list[float]] | None = None) -> ChoicesDecision:
    """Pick a choice from a ScoreOut's aligned lists (boundary token first in each list)."""
    method = get_choices_method(method)
    if not choices:
        raise ValueError("select needs at least one choice")
    input_lps = []
    for lps, ids, texts in zip(token_logprobs, token_ids, token_texts, strict=True):
        tokens = list(zip(lps, ids, texts))
        # No healing: the boundary token is the prefix's own last token; it is not the choice's.
        if len(tokens) > 1 and texts[0] and prefix_text.endswith(texts[0]):
            tokens = tokens[1:]
        input_lps.append(tokens)
    normalized = [_mean([t[0] for t in tokens if t[0] is not None]) for tokens in input_lps]
    uncond = None
    if unconditional_token_logprobs is not None:
        uncond = [[(lp, None, None) for lp in row] for row in unconditional_token_logprobs]
    return method(choices=choices, normalized_prompt_logprobs=normalized,
                  input_token_logprobs=input_lps, output_token_logprobs=[[] for _ in choices],
                  unconditional_token_logprobs=uncond)
