"""Run reports: model cards, plots and comparisons, read from run directories only (layer 5: may import
`growlm.train` and below, and reads nothing but what a run wrote)."""

from growlm.report.card import card_text, write_card
from growlm.report.compare import write_comparison
from growlm.report.run import DISTILL_FILE, EVAL_FILE, RunData, is_run_dir, load_run

__all__ = ["DISTILL_FILE", "EVAL_FILE", "RunData", "card_text", "is_run_dir", "load_run", "write_card", "write_comparison"]
