"""Reading a data file (.jsonl, .json, .csv, .parquet) or a Hugging Face Hub dataset as numbered rows:
what training data (train/data.py) and evaluation sets (evaluate/) are both read with."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from .errors import Nf4tuneError


class BadRow(ValueError):
    """A row that does not fit its format: `field` says which field, the message what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field, self.problem = field, problem


TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def not_utf8(path: str | Path) -> str | None:
    """Where the file at `path` stops being UTF-8 text ("line 3, byte 15": the offset in that line), or
    None if it is UTF-8 throughout. Read line by line: a large data file is never held whole."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number}, byte {e.start}"
    return None


def not_utf8_error(path: str | Path, where: str | None = None) -> Nf4tuneError:
    """The sentence for a data file that is not UTF-8 text."""
    where = where or not_utf8(path) or "somewhere"
    return Nf4tuneError(f"{path} is not UTF-8 text ({where} cannot be decoded); save it as UTF-8 (for example with "
                        "`iconv -f latin1 -t utf-8`).")


def read_rows(path: str, split: str = "train") -> Iterator[tuple[int, dict | BadRow]]:
    """(row number, row) from a .jsonl/.json/.csv/.parquet file, or a Hugging Face Hub dataset.
    Row numbers count from 1 (the line number for JSONL and CSV data rows). A JSONL line that is not
    valid JSON comes as a `BadRow` in place of the row, for the caller to stop at or skip."""
    p = Path(path)
    suffix = "".join(p.suffixes[-1:]).lower()
    if not p.exists():
        if suffix in (".jsonl", ".json", ".csv", ".parquet") or path.startswith((".", "/")):
            raise Nf4tuneError(f"data file {path} does not exist.")
        yield from _hub_rows(path, split)
        return
    if suffix == ".jsonl":
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark is no part of the row
                except UnicodeDecodeError as e:
                    raise not_utf8_error(path, f"line {n}, byte {e.start}") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = BadRow("-", f"is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                yield n, row
    elif suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise not_utf8_error(path) from None
        except json.JSONDecodeError as e:
            raise Nf4tuneError(f"{path} is not valid JSON ({e}).") from e
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))
        if not isinstance(rows, list):
            raise Nf4tuneError(f"{path} must hold a JSON list of rows.")
        yield from enumerate(rows, 1)
    elif suffix == ".csv":
        with p.open(encoding="utf-8-sig", newline="") as f:
            try:
                yield from ((n + 1, row) for n, row in enumerate(csv.DictReader(f), 1))
            except UnicodeDecodeError:
                raise not_utf8_error(path) from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise Nf4tuneError(f"reading {path} needs pyarrow: pip install pyarrow.") from e
        yield from enumerate(pq.read_table(p).to_pylist(), 1)
    else:
        raise Nf4tuneError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .csv or .parquet.")


def _hub_rows(name: str, split: str) -> Iterator[tuple[int, dict]]:
    """Rows of a Hub dataset; `name` may carry a config after a colon (`cais/mmlu:abstract_algebra`)."""
    try:
        import datasets
    except ImportError as e:
        raise Nf4tuneError(f"{name} is not a local file; loading Hub datasets needs `pip install datasets`.") from e
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:
        raise Nf4tuneError(f"dataset {name!r} (split {split!r}) could not be loaded: {str(e).splitlines()[0]}") from e
    yield from enumerate(ds, 1)
