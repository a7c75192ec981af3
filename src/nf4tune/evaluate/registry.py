"""The evaluation tasks `nf4tune eval` offers, in one place."""

from __future__ import annotations

from ..errors import Nf4tuneError

TASKS = ("perplexity", "multiple_choice")


def run_task(task: str, model_path: str, data: str, adapter: str | None = None, split: str = "test",
             dev: str | None = None, shots: int | None = None, method: str = "letter", limit: int | None = None,
             batch_size: int = 8, column: str = "text", max_length: int | None = None, stride: int | None = None,
             device: str | None = None, progress: bool = True, quant_type: str = "nf4"):
    """Load the model (its base quantized to `quant_type`, "none": 16-bit; with `adapter`) and run `task`
    on `data`; returns the task's result object."""
    from .. import load_model
    from .benchmarks import load_dev
    from .questions import load_questions

    if task not in TASKS:
        raise Nf4tuneError(f"unknown task {task!r}; choose {' or '.join(TASKS)}.")
    if batch_size < 1 or (limit is not None and limit < 1) or (shots is not None and shots < 0):
        raise Nf4tuneError("--batch-size and --limit must be at least 1, --shots at least 0.")
    # Read the data before loading the model: a bad file fails in a second, not after the load.
    if task == "multiple_choice":
        questions = load_questions(data, split, limit)
        dev_questions = load_dev(data, dev) if shots != 0 else None
    else:
        from .perplexity import read_text

        text = read_text(data, column, split, limit)
    model, tokenizer = load_model(model_path, quant_type=quant_type, adapter=adapter, device=device, progress=progress)
    if tokenizer is None:
        raise Nf4tuneError(f"{model_path} has no tokenizer; evaluation needs one.")
    if task == "multiple_choice":
        from .multiple_choice import evaluate_multiple_choice

        return evaluate_multiple_choice(model, tokenizer, questions, dev_questions, shots, method, batch_size, progress)
    from .perplexity import perplexity

    return perplexity(model, tokenizer, text, max_length, stride, batch_size, progress)


def compare_adapters(task: str, model_path: str, data: str, adapters: list[str | None], **options):
    """`run_task` once per adapter (None: the base alone) on the same base and data; one `Comparison`
    with a column per adapter. Each adapter gets the model to itself (a fresh load: its own tokenizer
    and added tokens), so each column is exactly what evaluating that adapter alone gives."""
    from ..models.adapters import read_adapter
    from .compare import Comparison

    for adapter in adapters:  # a bad folder fails now, not after the others' evaluations
        if adapter is not None:
            read_adapter(adapter)
    names = ["(base)" if a is None else str(a) for a in adapters]
    if len(set(names)) < len(names):
        raise Nf4tuneError("the same adapter is named twice; give each --adapter once.")
    return Comparison(names, [run_task(task, model_path, data, adapter=a, **options) for a in adapters])
