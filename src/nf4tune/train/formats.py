"""Dataset formats: each turns one row into segments of text, each trained on or not.

The formats are those of the QLoRA code (alpaca, self-instruct, chip2, hh-rlhf, longform, OASST1 /
Guanaco), plus prompt/completion, chat `messages` rendered with the tokenizer's chat template, and
plain `text`. The format is detected from the columns unless the recipe names it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The Alpaca prompts, as the QLoRA code uses them.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)

FORMATS = ("alpaca", "oasst1", "prompt_completion", "input_output", "chip2", "hh_rlhf", "longform", "messages", "text")


class BadRow(ValueError):
    """A row that does not fit its format: `field` says which field, the message what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field, self.problem = field, problem


@dataclass
class Example:
    """A row as (source, target): the loss is on the target; `segments` holds multi-turn chats as
    (text, trained) pieces instead."""

    source: str = ""
    target: str = ""
    segments: list[tuple[str, bool]] | None = None


def detect_format(columns: set[str]) -> str:
    """The format a row with these columns is in, or raise naming what is expected."""
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "chosen" in columns:
        return "hh_rlhf"
    if "input" in columns and "output" in columns:
        return "input_output"
    if "text" in columns:
        return "text"  # refined per row: Guanaco ("### Human:") and chip2 ("<human>:") text are text too
    raise BadRow(
        sorted(columns)[0] if columns else "?",
        "does not identify a format: expected columns like instruction/output (alpaca), prompt/completion, "
        "input/output, chosen (hh-rlhf), messages (chat) or text; set data.format to say which",
    )


def _text(row: dict, field: str, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise BadRow(field, "is missing")
    value = row[field]
    if not isinstance(value, str):
        raise BadRow(field, f"must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(field, "is empty")
    return value


def to_example(row: dict, fmt: str, tokenizer=None) -> Example:
    """Render one row of format `fmt`; raises BadRow for a row that does not fit."""
    if fmt == "alpaca":
        instruction = _text(row, "instruction")
        context = _text(row, "input", allow_empty=True) if row.get("input") is not None else ""
        prompt = ALPACA_WITH_INPUT.format(instruction=instruction, input=context) if context.strip() else \
            ALPACA_NO_INPUT.format(instruction=instruction)
        return Example(prompt, _text(row, "output"))
    if fmt == "prompt_completion":
        return Example(_text(row, "prompt", allow_empty=True), _text(row, "completion"))
    if fmt in ("input_output", "longform"):
        return Example(_text(row, "input", allow_empty=True), _text(row, "output"))
    if fmt == "hh_rlhf":
        return Example("", _text(row, "chosen"))
    if fmt == "chip2":
        text = _text(row, "text")
        if "\n<bot>: " not in text:
            raise BadRow("text", "has no '\\n<bot>: ' turn (chip2 format)")
        human, bot = text.split("\n<bot>: ", 1)
        return Example(human.replace("<human>: ", ""), bot)
    if fmt in ("oasst1", "text"):
        # OASST1 / Guanaco rows are whole "### Human: ... ### Assistant: ..." conversations, trained
        # on in full as the QLoRA code does.
        return Example("", _text(row, "text"))
    if fmt == "messages":
        return _chat_example(row, tokenizer)
    raise ValueError(f"unknown format {fmt!r}")


def _chat_example(row: dict, tokenizer) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("messages", "must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(f"messages[{i}]", "must have a string role and content")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRow("messages", "has no non-empty assistant turn")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRow("messages", "needs a tokenizer with a chat template; use a chat model or another format")
    # Each assistant turn is trained on; what the template puts before it is not.
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise BadRow("messages", "renders differently as it grows; the chat template is not incremental")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return Example(segments=[s for s in segments if s[0]])
