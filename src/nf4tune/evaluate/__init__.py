"""Evaluation: perplexity, MMLU-style multiple choice, exact match of chat replies, benchmarks run during
training, and pairwise judging of answers with Elo ratings. The CLI's `eval` and `judge` call into here.

Names load on first use, so the command line can read `registry.TASKS` without importing torch."""

from ..lazy import lazy_names

_LAZY = {
    "BenchmarkSpec": ".benchmarks", "run_benchmarks": ".benchmarks",
    "reply_matches": ".exact_match", "trim_at_end_of_turn": ".exact_match",
    "MultipleChoiceResult": ".multiple_choice", "evaluate_multiple_choice": ".multiple_choice",
    "PerplexityResult": ".perplexity",  # the function: nf4tune.evaluate.perplexity.perplexity
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
