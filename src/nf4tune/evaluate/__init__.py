"""Evaluation: perplexity, MMLU-style multiple choice, exact match of chat replies, benchmarks run during
training, and pairwise judging of answers with Elo ratings. The CLI's `eval` and `judge` call into here."""

from .benchmarks import BenchmarkSpec, run_benchmarks
from .exact_match import reply_matches, trim_at_end_of_turn
from .multiple_choice import MultipleChoiceResult, evaluate_multiple_choice
from .perplexity import PerplexityResult, perplexity

__all__ = [
    "BenchmarkSpec",
    "MultipleChoiceResult",
    "PerplexityResult",
    "evaluate_multiple_choice",
    "perplexity",
    "reply_matches",
    "run_benchmarks",
    "trim_at_end_of_turn",
]
