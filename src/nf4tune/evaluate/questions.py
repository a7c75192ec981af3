"""Multiple-choice questions in the MMLU format, read from a file or a Hub dataset and checked row by row."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import Nf4tuneError
from ..rows import BadRow
from ..rows import read_rows as read_file_rows

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""
    row: int = 0  # row number in its source, from 1


# A Hub MMLU named without a config means its `all` config.
_DEFAULT_CONFIGS = {"cais/mmlu": "all", "hails/mmlu_no_train": "all"}


def read_rows(source: str, split: str) -> Iterator[tuple[int, dict | BadRow]]:
    """(row number, row) of a local .jsonl/.json/.csv/.parquet file or a Hub dataset split
    (`repo:config`; MMLU's repositories default to their `all` config)."""
    if source in _DEFAULT_CONFIGS and not Path(source).exists():
        source = f"{source}:{_DEFAULT_CONFIGS[source]}"
    yield from read_file_rows(source, split)


def _choices(row: dict) -> list | None:
    if "choices" in row:
        choices = row["choices"]
        if isinstance(choices, str):  # a CSV cell holding a JSON list
            import json

            try:
                choices = json.loads(choices)
            except ValueError:
                return None
        return list(choices) if isinstance(choices, (list, tuple)) else None
    letters = [c for c in LETTERS if c in row]
    return [row[c] for c in letters] if len(letters) >= 2 and letters == list(LETTERS[:len(letters)]) else None


def parse_question(row: dict, source: str, number: int) -> Question:
    """One row as a Question, or an error naming the file, the row and what to fix."""
    where = f"{source}, row {number}"
    if not isinstance(row, dict):
        raise Nf4tuneError(f"{where}: expected an object with question, choices and answer.")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise Nf4tuneError(f"{where}: missing 'question' text; each row needs question, choices (or A..D) and answer.")
    choices = _choices(row)
    if choices is None or len(choices) < 2 or any(not isinstance(c, (str, int, float)) for c in choices):
        raise Nf4tuneError(f"{where}: missing 'choices' (a list of answers) or columns A, B, C, D.")
    if len(choices) > len(LETTERS):
        raise Nf4tuneError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} are supported.")
    choices = [str(c) for c in choices]
    answer = row.get("answer")
    n = len(choices)
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    if isinstance(answer, bool) or answer is None:
        index = None
    elif isinstance(answer, int):
        index = answer if 0 <= answer < n else None
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[:n] and len(answer.strip()) == 1:
        index = LETTERS.index(answer.strip().upper())
    else:
        index = None
    if index is None:
        raise Nf4tuneError(f"{where}: answer {answer!r} is not among the {n} choices; give a letter "
                           f"{LETTERS[0]}-{LETTERS[n - 1]} or an index 0-{n - 1}.")
    subject = row.get("subject") or ""
    return Question(question, tuple(choices), index, str(subject), number)


def load_questions(source: str, split: str = "test", limit: int | None = None) -> list[Question]:
    """The questions of `source` (a file or Hub id), at most `limit`; an empty source is an error."""
    questions = []
    for number, row in read_rows(source, split):
        if limit is not None and len(questions) >= limit:
            break
        questions.append(parse_question(row, source, number))
    if not questions:
        raise Nf4tuneError(f"{source} has no questions; expected rows with question, choices and answer.")
    return questions
