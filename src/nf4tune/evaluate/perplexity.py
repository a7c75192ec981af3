"""Perplexity of a text in windows of the model's context with a stride, as transformers' perplexity guide
defines it: each window scores only the tokens the previous window did not, with the rest as context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Nf4tuneError
from .scoring import context_length, tail_logits


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    windows: int
    max_length: int
    stride: int

    def table(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (mean loss {self.nll:.4f} nats) over {self.tokens} tokens, "
                f"{self.windows} window(s) of {self.max_length} tokens with stride {self.stride}")

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for a side-by-side table (`evaluate.compare`)."""
        return [("perplexity", f"{self.perplexity:.4f}"), ("mean loss (nats)", f"{self.nll:.4f}"),
                ("tokens scored", str(self.tokens))]

    def notes(self) -> str:
        return f"{self.windows} window(s) of {self.max_length} tokens with stride {self.stride}"

    def as_json(self) -> dict:
        return {"task": "perplexity", "perplexity": self.perplexity, "nll": self.nll, "n": self.tokens,
                "windows": self.windows, "max_length": self.max_length, "stride": self.stride}


def read_text(source: str, column: str = "text", split: str = "test", limit: int | None = None) -> str:
    """A .txt file as it is, or the `column` of a data file / Hub dataset joined with blank lines (as the
    transformers guide joins wikitext)."""
    from .questions import read_rows

    p = Path(source)
    if p.suffix.lower() in (".txt", ".md", "") and p.is_file():
        text = p.read_text(encoding="utf-8")
    else:
        parts = []
        for number, row in read_rows(source, split):
            if limit is not None and len(parts) >= limit:
                break
            value = row.get(column) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise Nf4tuneError(f"{source}, row {number}: missing text column {column!r} (choose it with --column).")
            parts.append(value)
        text = "\n\n".join(parts)
    if not text.strip():
        raise Nf4tuneError(f"{source} has no text to score.")
    return text


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: tokens [begin, end) are fed, the last `scored` of them are scored
    (the very first token of the text never is: nothing predicts it)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Token-level perplexity of `text` under `model`; each token's loss in float32, summed in float32 per
    window. `max_length` defaults to the model's context, `stride` to half of it."""
    from tqdm.auto import tqdm

    from ..checkpoint.architecture import is_encoder_decoder

    if is_encoder_decoder(model.config):  # windows of one sequence predicting itself
        raise Nf4tuneError("perplexity needs a causal (decoder-only) language model.")
    max_length = max_length or context_length(model, tokenizer)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise Nf4tuneError(f"stride {stride} must be between 1 and the window length {max_length}.")
    ids = list(tokenizer(text).input_ids)
    spans = windows(len(ids), max_length, stride)
    if not spans:
        raise Nf4tuneError("the text is a single token; perplexity needs at least two.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress) as bar:
        for start in range(0, len(spans), batch_size):
            group = spans[start:start + batch_size]
            logits = tail_logits(model, [ids[b:e - 1] for b, e, _ in group], [s for _, _, s in group],
                                 batch_size, pad_id)
            for (b, e, s), lg in zip(group, logits):
                targets = torch.tensor(ids[e - s:e])
                losses = -torch.log_softmax(lg, -1).gather(1, targets[:, None])[:, 0]
                total += float(losses.sum(dtype=torch.float32))
                count += s
            bar.update(len(group))
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count, windows=len(spans),
                            max_length=max_length, stride=stride)
