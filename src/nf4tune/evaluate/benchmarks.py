"""Benchmarks run during training (`eval.benchmarks` in a recipe): each a task on a data set, scored into
`metrics.jsonl` keys such as `mmlu_accuracy`."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from ..errors import Nf4tuneError

TASKS = ("multiple_choice", "perplexity")


@dataclass
class BenchmarkSpec:
    """One entry of `eval.benchmarks`, e.g. `{task: multiple_choice, data: cais/mmlu, split: validation, shots: 5}`."""

    data: str
    task: str = "multiple_choice"  # multiple_choice | perplexity
    split: str = "validation"  # the Hub split (ignored for local files)
    dev: str | None = None  # solved examples: a file, or a Hub split name; Hub data default to its `dev` split
    shots: int | None = None  # default 5 where there are dev examples, else 0
    limit: int | None = None  # at most this many questions (rows of text for perplexity)
    method: str = "letter"  # letter | loglikelihood
    batch_size: int = 8
    name: str | None = None  # metric key prefix; default `mmlu` for MMLU, else the data file's stem
    column: str = "text"  # perplexity: the text column
    max_length: int | None = None  # perplexity: window length (default the model's context)
    stride: int | None = None  # perplexity: window stride (default half the window)

    @property
    def key(self) -> str:
        if self.name:
            return self.name
        if not Path(self.data).suffix:  # a Hub id
            return "mmlu" if "mmlu" in self.data.lower() else self.data.rsplit("/", 1)[-1].replace(":", "_")
        stem = Path(self.data).stem
        return stem.replace("-", "_").replace(".", "_").replace(":", "_")


def parse_benchmarks(items: list, where: str = "eval.benchmarks") -> list[BenchmarkSpec]:
    """Recipe entries as BenchmarkSpecs; an unknown key, a missing `data` or an unknown task is one sentence."""
    if not isinstance(items, list):
        raise Nf4tuneError(f"{where} must be a list of benchmarks, e.g. [{{task: multiple_choice, data: cais/mmlu}}].")
    fields = {f.name for f in dataclasses.fields(BenchmarkSpec)}
    specs = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise Nf4tuneError(f"{here} must be a mapping such as {{task: multiple_choice, data: FILE}}.")
        for k in item:
            if k not in fields:
                match = difflib.get_close_matches(k, sorted(fields), n=1)
                hint = f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(fields))}."
                raise Nf4tuneError(f"{here}: unknown key {k!r}{hint}")
        if "data" not in item:
            raise Nf4tuneError(f"{here} needs `data`: a file or a Hub dataset id.")
        spec = BenchmarkSpec(**item)
        if spec.task not in TASKS:
            raise Nf4tuneError(f"{here}: unknown task {spec.task!r}; choose {' or '.join(TASKS)}.")
        specs.append(spec)
    keys = [s.key for s in specs]
    for k in keys:
        if keys.count(k) > 1:
            raise Nf4tuneError(f"{where}: two benchmarks are both named {k!r}; give one a `name`.")
    return specs


_loaded: dict = {}  # data read once per process, not at every evaluation


def load_benchmark_data(spec: BenchmarkSpec):
    """(questions, dev questions) for multiple choice, or the text for perplexity; cached."""
    from .perplexity import read_text
    from .questions import load_questions

    cache_key = dataclasses.astuple(spec)
    if cache_key not in _loaded:
        if spec.task == "perplexity":
            _loaded[cache_key] = read_text(spec.data, spec.column, spec.split, spec.limit)
        else:
            _loaded[cache_key] = (load_questions(spec.data, spec.split, spec.limit), load_dev(spec.data, spec.dev))
    return _loaded[cache_key]


def load_dev(data: str, dev: str | None):
    """Solved examples: the `dev` file, a `dev` split name of a Hub dataset, or (for Hub data) its `dev`
    split where it has one; None where there are none."""
    from .questions import load_questions

    if dev is not None and Path(dev).suffix:
        return load_questions(dev)
    if Path(data).exists() or Path(data).suffix:
        return None
    try:
        return load_questions(data, dev or "dev")
    except Nf4tuneError:
        if dev is not None:
            raise
        return None


def run_benchmarks(model, tokenizer, specs: list[BenchmarkSpec], progress: bool = False) -> dict[str, float]:
    """Score `model` on each benchmark; keys `{name}_accuracy` and `{name}_accuracy_subject_mean` for
    multiple choice, `{name}_perplexity` for perplexity. Leaves the model in the mode it was in."""
    from .multiple_choice import evaluate_multiple_choice
    from .perplexity import perplexity

    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        for spec in specs:
            data = load_benchmark_data(spec)
            if spec.task == "perplexity":
                result = perplexity(model, tokenizer, data, spec.max_length, spec.stride, spec.batch_size, progress)
                metrics[f"{spec.key}_perplexity"] = result.perplexity
            else:
                questions, dev = data
                result = evaluate_multiple_choice(model, tokenizer, questions, dev, spec.shots, spec.method,
                                                  spec.batch_size, progress)
                metrics[f"{spec.key}_accuracy"] = result.accuracy
                metrics[f"{spec.key}_accuracy_subject_mean"] = result.accuracy_subject_mean
    finally:
        model.train(was_training)
    return metrics
