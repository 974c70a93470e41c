"""Evaluation: lm-evaluation-harness-compatible scoring and tasks read from local files.

May import `growlm.models`; nothing above. `evaluate` takes every task (the log-likelihood tasks of
`tasks.py`, and mmlu, truthfulqa_mc1/mc2, gsm8k of `leaderboard.py`); `evaluate_suite` runs the Open LLM
Leaderboard row; `generate_until` is the harness's greedy generation.
"""

from growlm.eval.generate import generate_until
from growlm.eval.leaderboard import SEED_CARD_ROW, SUITES, evaluate, evaluate_suite, suite_tasks
from growlm.eval.scoring import (
    loglikelihood,
    loglikelihood_rolling,
    loglikelihood_tokens,
    mean_stderr,
    perplexity,
    rolling_windows,
    tok_encode,
)

__all__ = ["SEED_CARD_ROW", "SUITES", "evaluate", "evaluate_suite", "generate_until", "loglikelihood",
           "loglikelihood_rolling", "loglikelihood_tokens", "mean_stderr", "perplexity", "rolling_windows",
           "suite_tasks", "tok_encode"]
