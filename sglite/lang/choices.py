"""SGLang's module path for the choice methods (`from sglang.lang.choices import ...`)."""

from sglite.choices import (ChoicesDecision, ChoicesSamplingMethod, greedy_token_selection,
                            token_length_normalized, unconditional_likelihood_normalized)

__all__ = ["ChoicesDecision", "ChoicesSamplingMethod", "greedy_token_selection",
           "token_length_normalized", "unconditional_likelihood_normalized"]
