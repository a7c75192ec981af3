"""Several adapters' results on one task, side by side: a row per metric, a column per adapter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Comparison:
    names: list[str]  # the column headings: each adapter as it was named, "(base)" for none
    results: list  # one task result per name (PerplexityResult or MultipleChoiceResult), in order

    def table(self) -> str:
        """One table; a metric one result lacks (a subject absent from its data) shows as `-`."""
        per_column = [dict(r.rows()) for r in self.results]
        labels = list(dict.fromkeys(label for r in self.results for label, _ in r.rows()))
        first = max(len(label) for label in labels) + 2
        widths = [max(len(name), *(len(c.get(label, "-")) for label in labels)) for name, c in zip(self.names, per_column)]
        lines = [" " * first + "  ".join(f"{n:>{w}}" for n, w in zip(self.names, widths))]
        lines += [f"{label:<{first}}" + "  ".join(f"{c.get(label, '-'):>{w}}" for c, w in zip(per_column, widths))
                  for label in labels]
        notes = [r.notes() for r in self.results]
        if len(set(notes)) > 1:  # each column's own (a tokenizer with added tokens can drop other examples)
            notes = [f"{name}: {note}" for name, note in zip(self.names, notes)]
        return "\n".join(lines + notes[:1] if len(set(notes)) == 1 else lines + notes)

    def as_json(self) -> dict:
        return {"task": self.results[0].as_json()["task"],
                "adapters": {name: r.as_json() for name, r in zip(self.names, self.results)}}
