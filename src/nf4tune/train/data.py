"""Training data: rows from files or the Hub, rendered by format, tokenized, batched deterministically."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import Nf4tuneError
from ..models.loss import IGNORE_INDEX  # noqa: F401  (the collated labels use it; re-exported)
from ..rows import BadRow, read_rows
from .formats import FORMATS, Example, detect_format, to_example

log = logging.getLogger("nf4tune")


@dataclass
class Tokenized:
    """One example's tokens. Decoder-only: `labels` is aligned with `input_ids` (IGNORE_INDEX where no loss
    is taken). Encoder-decoder (`seq2seq`): `input_ids` is the encoder's source and `labels` the decoder's
    own sequence (target + eos), from which the model builds the decoder's input by shifting it right."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set on packed rows: positions restart at each example
    seq2seq: bool = False

    @property
    def length(self) -> int:
        """Tokens the model reads for this example: both sides of an encoder-decoder's."""
        return len(self.input_ids) + (len(self.labels) if self.seq2seq else 0)


@dataclass
class DataStats:
    """What reading a dataset found, for the run summary."""

    source: str
    format: str = ""
    rows: int = 0
    used: int = 0
    skipped: int = 0
    truncated: int = 0
    skip_reasons: list[str] = field(default_factory=list)


class BadRowError(Nf4tuneError):
    def __init__(self, path, row, field, problem):
        super().__init__(f"{path}, row {row}: field {field!r} {problem}." if field != "-" else f"{path}, row {row} {problem}.")


def _resolve_format(fmt: str, row: dict) -> str:
    if fmt != "auto":
        return fmt
    found = detect_format(set(row))
    if found == "text" and isinstance(row.get("text"), str):
        if "<human>: " in row["text"] and "\n<bot>: " in row["text"]:
            return "chip2"
        if "### Human:" in row["text"]:
            return "oasst1"
    return found


def tokenize_example(ex: Example, tokenizer, source_max_len: int, target_max_len: int,
                     train_on_source: bool) -> tuple[Tokenized, bool]:
    """Token ids and labels (IGNORE_INDEX where no loss is taken); and whether anything was cut."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    if ex.segments is not None:  # chat: the template supplies the special tokens
        ids, labels = [], []
        for text, trained in ex.segments:
            t = encode(text)
            ids += t
            labels += t if (trained or train_on_source) else [IGNORE_INDEX] * len(t)
        limit = source_max_len + target_max_len
        return Tokenized(ids[:limit], labels[:limit]), len(ids) > limit
    source, target = encode(ex.source), encode(ex.target)
    truncated = len(source) > source_max_len or len(target) + 1 > target_max_len
    source = source[:source_max_len]
    target = target[: target_max_len - 1] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + source + target
    prompt_labels = bos + source if train_on_source else [IGNORE_INDEX] * (len(bos) + len(source))
    return Tokenized(ids, prompt_labels + target), truncated


def _seq2seq_pair(ex: Example) -> tuple[str, str]:
    """(source, target) of an example for an encoder-decoder. A chat trains on its last assistant turn,
    with the conversation before it (earlier replies included) as the source."""
    if ex.segments is None:
        return ex.source, ex.target
    last = max(i for i, (_, trained) in enumerate(ex.segments) if trained)
    return "".join(text for text, _ in ex.segments[:last]), ex.segments[last][0]


def tokenize_seq2seq_example(ex: Example, tokenizer, source_max_len: int, target_max_len: int
                             ) -> tuple[Tokenized, bool]:
    """An encoder-decoder's example: the source, with the tokenizer's own special tokens (T5's appends
    eos), for the encoder; the target + eos as labels, all of them trained on (the model shifts them right
    behind its decoder_start_token_id for the decoder's input). Each side is cut to its own maximum."""
    source, target = _seq2seq_pair(ex)
    encoder_ids = tokenizer(source)["input_ids"] if source else []
    cut = len(encoder_ids) > source_max_len
    if cut:  # transformers' truncation keeps the special tokens inside the limit
        encoder_ids = tokenizer(source, truncation=True, max_length=source_max_len)["input_ids"]
    if not encoder_ids:
        raise BadRow("-", "gives the encoder no source text (an encoder-decoder learns source -> target pairs; "
                          "use a format with a prompt, such as prompt_completion)")
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] if target else []
    cut |= len(target_ids) + 1 > target_max_len
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    labels = target_ids[: target_max_len - 1] + eos
    return Tokenized(encoder_ids, labels, seq2seq=True), cut


def load_examples(path: str, split: str, fmt: str, tokenizer, source_max_len: int, target_max_len: int,
                  train_on_source: bool, on_bad_row: str = "error", max_samples: int | None = None,
                  seq2seq: bool = False) -> tuple[list[Tokenized], DataStats]:
    """Read, render and tokenize a dataset, for a decoder-only model or (`seq2seq`) an encoder-decoder.
    Bad rows raise (naming file, row and field) or are skipped and counted, as `on_bad_row` says. An
    empty result is an error."""
    if fmt != "auto" and fmt not in FORMATS:
        raise Nf4tuneError(f"data.format is {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    if seq2seq and train_on_source:
        raise Nf4tuneError("data.train_on_source is for decoder-only models: an encoder-decoder such as T5 reads "
                           "the source in its encoder and learns only the target; turn it off.")
    stats = DataStats(source=path)
    examples: list[Tokenized] = []
    for number, row in read_rows(path, split):
        if max_samples is not None and stats.rows >= max_samples:
            break
        stats.rows += 1
        try:
            if isinstance(row, BadRow):  # a line read_rows could not parse
                raise row
            if not isinstance(row, dict):
                raise BadRow("-", f"is a {type(row).__name__}, not an object")
            if not stats.format:  # detected once, from the first row; every row must then fit it
                stats.format = _resolve_format(fmt, row)
            row_format = stats.format
            example = to_example(row, row_format, tokenizer)
            tokenized, cut = (tokenize_seq2seq_example(example, tokenizer, source_max_len, target_max_len) if seq2seq
                              else tokenize_example(example, tokenizer, source_max_len, target_max_len,
                                                    train_on_source))
            if all(label == IGNORE_INDEX for label in tokenized.labels):
                raise BadRow("-", "leaves nothing to train on after truncation")
        except BadRow as e:
            if on_bad_row == "error":
                raise BadRowError(path, number, e.field, e.problem) from None
            stats.skipped += 1
            if len(stats.skip_reasons) < 3:
                stats.skip_reasons.append(f"row {number}: {e}" if e.field != "-" else f"row {number} {e.problem}")
            continue
        stats.truncated += cut
        examples.append(tokenized)
    stats.used = len(examples)
    if not examples:
        raise Nf4tuneError(f"{path} gives no usable examples ({stats.rows} rows read, {stats.skipped} skipped).")
    if stats.truncated:
        log.warning("nf4tune: %d of %d examples from %s were truncated to source_max_len / target_max_len.",
                    stats.truncated, stats.used, path)
    return examples, stats


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The batches of one epoch as lists of example indices, the same for the same seed and epoch.

    With group_by_length, examples are shuffled, cut into mega-batches of 50 batches, and sorted by
    length inside each (as transformers' LengthGroupedSampler), so batches pad little.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if group_by_length:
        mega = batch_size * 50
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and len(batches) > 1:  # keep the longest batch first: memory problems show at once
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def pack(examples: list[Tokenized], max_len: int, seed: int | None = None) -> list[Tokenized]:
    """Concatenate short examples into rows of at most `max_len` tokens (first fit, in a seeded order,
    or in the order given when `seed` is None). Positions restart at each example, from which
    transformers builds a block-diagonal causal mask: no token attends across an example boundary.
    The first label of each example is dropped, so nothing is learned across one either."""
    order = (range(len(examples)) if seed is None
             else torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist())
    rows: list[Tokenized] = []
    for i in order:
        e = examples[i]
        labels = [IGNORE_INDEX] + e.labels[1:]
        positions = list(range(len(e.input_ids)))
        row = next((r for r in rows if len(r.input_ids) + len(e.input_ids) <= max_len), None)
        if row is None:
            rows.append(Tokenized(list(e.input_ids), labels, positions))
        else:
            row.input_ids += e.input_ids
            row.labels += labels
            row.position_ids += positions
    return rows


@dataclass
class Packing:
    """What `data.packing` makes of one epoch. A batch is `batch_size` examples, as without packing,
    packed on its own into rows of at most `max_len` tokens: packing saves padding, and leaves the
    steps per epoch and what each step learns as they were."""

    examples: int
    rows: int
    max_len: int
    batch_size: int
    batches: int
    fewest_rows: int
    most_rows: int

    def describe(self) -> str:
        spread = (f"{self.fewest_rows}" if self.fewest_rows == self.most_rows
                  else f"{self.fewest_rows}-{self.most_rows}")
        return (f"{self.examples} examples packed into {self.rows} rows of at most {self.max_len} tokens per epoch: "
                f"each batch of {self.batch_size} examples (per_device_train_batch_size counts examples) packs "
                f"into {spread} rows; {self.batches} batches per epoch, as without packing")


def plan_packing(examples: list[Tokenized], batch_size: int, max_len: int, seed: int,
                 group_by_length: bool) -> Packing:
    """How the first epoch's batches pack (later epochs differ only in order)."""
    lengths = [len(e.input_ids) for e in examples]
    per_batch = [len(pack([examples[i] for i in b], max_len))
                 for b in batch_order(lengths, batch_size, seed, 0, group_by_length)]
    return Packing(len(examples), sum(per_batch), max_len, batch_size, len(per_batch), min(per_batch), max(per_batch))


def _collate_seq2seq(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """An encoder-decoder's batch: the sources right-padded with an attention_mask, the labels right-padded
    to their own width with IGNORE_INDEX (the model's shift turns those into pad tokens, and no loss is
    taken there), as transformers' DataCollatorForSeq2Seq pads them."""
    source_width = max(len(e.input_ids) for e in examples)
    label_width = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), source_width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), source_width), dtype=torch.long)
    labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)], mask[row, :len(e.input_ids)] = torch.tensor(e.input_ids), 1
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / labels, with an attention_mask; packed rows get position_ids instead
    of a mask (their padding then counts as one more sequence, with no labels). An encoder-decoder's
    sources and labels are padded each to their own width."""
    if examples[0].seq2seq:
        return _collate_seq2seq(examples, pad_id)
    packed = examples[0].position_ids is not None
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels)
        if packed:
            extra[row, :n], extra[row, n:] = torch.tensor(e.position_ids), torch.arange(width - n)
        else:
            extra[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "position_ids" if packed else "attention_mask": extra}
