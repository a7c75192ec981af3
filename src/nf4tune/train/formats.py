"""Dataset formats: each turns one row into segments of text, each trained on or not.

The formats are those of the QLoRA code (alpaca, self-instruct, chip2, hh-rlhf, longform, OASST1 /
Guanaco), plus prompt/completion, chat `messages` rendered with the tokenizer's chat template, and
plain `text`. The format is detected from the columns unless the recipe names it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..rows import BadRow

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


# --- The prompt format an adapter was trained with, carried beside it ---------------------------
#
# An adapter answers well only in the prompt format it was trained on (the demo adapter, trained on
# bare "Is 12 even or odd? " prompts, babbles when its input is wrapped in Guanaco's "### Human:").
# Training writes `nf4tune_prompt.json` into the adapter folder; chat and generate read it.

PROMPT_FORMAT_FILE = "nf4tune_prompt.json"
# How text is put to a model at inference time; the chat command offers these (plus "auto").
PROMPT_STYLES = ("template", "guanaco", "alpaca", "chip2", "raw")
# The inference style that matches each training data format.
_STYLE_OF_DATA_FORMAT = {
    "alpaca": "alpaca", "oasst1": "guanaco", "chip2": "chip2", "messages": "template",
    "prompt_completion": "raw", "input_output": "raw", "longform": "raw", "hh_rlhf": "raw", "text": "raw",
}


def prompt_style_for(data_format: str) -> str:
    """The inference prompt style matching training data in `data_format` (a name in FORMATS)."""
    if data_format not in _STYLE_OF_DATA_FORMAT:
        raise ValueError(f"unknown data format {data_format!r}")
    return _STYLE_OF_DATA_FORMAT[data_format]


def save_prompt_format(adapter_dir, data_format: str) -> None:
    """Record in `adapter_dir` the prompt format its training data had (call after saving the adapter)."""
    import json
    from pathlib import Path

    from ..atomic import atomic_write_text

    record = {"data_format": data_format, "prompt_style": prompt_style_for(data_format)}
    atomic_write_text(Path(adapter_dir) / PROMPT_FORMAT_FILE, json.dumps(record, indent=2) + "\n")


def prompt_format_of(adapter_dir) -> str | None:
    """The prompt style (one of PROMPT_STYLES) the adapter in `adapter_dir` was trained with, or None
    when it does not say (a PEFT adapter, or one saved before nf4tune recorded it)."""
    import json
    from pathlib import Path

    path = Path(adapter_dir) / PROMPT_FORMAT_FILE
    if not path.is_file():
        return None
    try:
        style = json.loads(path.read_text(encoding="utf-8")).get("prompt_style")
    except (OSError, ValueError, AttributeError):
        return None
    return style if style in PROMPT_STYLES else None


def render_plain_prompt(messages: list[dict], style: str) -> str:
    """The prompt for `messages` in the styles that need no tokenizer: alpaca (the last user turn as the
    instruction), chip2 ("<human>: ... \\n<bot>: " turns) and raw (the last user turn as it is)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    last = users[-1] if users else ""
    if style == "alpaca":
        return ALPACA_NO_INPUT.format(instruction=last)
    if style == "chip2":
        turns = "".join(f"<human>: {m['content']}\n<bot>: " if m["role"] == "user" else f"{m['content']}\n"
                        for m in messages if m["role"] in ("user", "assistant"))
        return turns
    if style == "raw":
        return last
    raise ValueError(f"style {style!r} needs a tokenizer")
