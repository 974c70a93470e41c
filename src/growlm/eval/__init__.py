"""Evaluation: lm-evaluation-harness-compatible scoring and tasks read from local files.

May import `growlm.models`; nothing above.
"""

from growlm.eval.scoring import (
    evaluate,
    loglikelihood,
    loglikelihood_rolling,
    loglikelihood_tokens,
    mean_stderr,
    perplexity,
    rolling_windows,
    tok_encode,
)

__all__ = ["evaluate", "loglikelihood", "loglikelihood_rolling", "loglikelihood_tokens", "mean_stderr",
           "perplexity", "rolling_windows", "tok_encode"]
