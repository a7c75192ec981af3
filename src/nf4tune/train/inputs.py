"""What a run trains on: the tokenizer, the training and held-out examples, and the stream of batches."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.architecture import is_encoder_decoder
from ..checkpoint.hf import load_tokenizer, open_checkpoint, resolve
from ..errors import Nf4tuneError
from .config import Recipe
from .data import DataStats, Tokenized, batch_order, load_examples, pack
from .tokens import add_tokens_to_tokenizer

log = logging.getLogger("nf4tune")


@dataclass
class Inputs:
    """What `load_inputs` read for a run."""

    model_path: Path
    tokenizer: object
    seq2seq: bool  # an encoder-decoder (T5): source and target tokenized and batched apart
    examples: list[Tokenized]
    eval_examples: list[Tokenized]
    stats: DataStats


def load_inputs(recipe: Recipe, is_main: bool = True) -> Inputs:
    """The tokenizer (with any added tokens) and the training and evaluation examples, read before
    the model loads. `is_main`: this process is the one that warns (rank 0)."""
    d = recipe.data
    model_path = resolve(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path)  # a folder's tokenizer files, or a GGUF file's metadata
    if tokenizer is None:
        raise Nf4tuneError(f"{recipe.model.name_or_path} has no tokenizer files; training needs one.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    add_tokens_to_tokenizer(tokenizer, recipe.model.add_tokens, recipe.model.add_special_tokens)
    # An encoder-decoder (T5) reads the source in its encoder and the target in its decoder: the data
    # is tokenized and batched apart for it, and cannot be packed into one sequence.
    seq2seq = is_encoder_decoder(open_checkpoint(model_path).config)
    if d.packing and seq2seq:
        raise Nf4tuneError("data.packing is for decoder-only models; turn it off for encoder-decoders such as T5.")
    if is_main:
        _warn_past_context(model_path, d.source_max_len, d.target_max_len)
    examples, stats = load_examples(d.path, d.split, d.format, tokenizer, d.source_max_len, d.target_max_len,
                                    d.train_on_source, d.on_bad_row, d.max_samples, seq2seq)
    if recipe.eval.path:
        eval_split = "validation" if not Path(recipe.eval.path).exists() else d.split
        eval_examples, _ = load_examples(recipe.eval.path, eval_split, d.format, tokenizer, d.source_max_len,
                                         d.target_max_len, d.train_on_source, d.on_bad_row,
                                         recipe.eval.max_eval_samples, seq2seq)
    else:
        examples, eval_examples = _split_eval(recipe, examples)
    max_eval = recipe.eval.max_eval_samples
    return Inputs(model_path, tokenizer, seq2seq, examples, eval_examples[:max_eval] if max_eval else eval_examples,
                  stats)


def _split_eval(recipe: Recipe, examples: list[Tokenized]) -> tuple[list[Tokenized], list[Tokenized]]:
    size = recipe.eval.size
    if size <= 0:
        return examples, []
    n = int(size) if size >= 1 else max(1, int(round(size * len(examples))))
    if n >= len(examples):
        raise Nf4tuneError(f"eval.size {size} leaves no training data ({len(examples)} examples).")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(recipe.training.seed)).tolist()
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n]]


def _warn_past_context(model_path: Path, source_max_len: int, target_max_len: int) -> None:
    """Warn when examples may be longer than the context the model was made for (its config's
    max_position_embeddings): positions past it were never trained, and the loss there means little."""
    try:
        config = open_checkpoint(model_path).config
    except Nf4tuneError:
        return  # loading the model says what is wrong
    context = config.get("max_position_embeddings") or config.get("n_positions")
    wanted = source_max_len + target_max_len
    if isinstance(context, int) and wanted > context:
        log.warning("nf4tune: data.source_max_len + data.target_max_len = %d + %d tokens, more than the %d-token context "
                    "the model was made for (max_position_embeddings): longer examples run past the positions it knows; "
                    "lower data.source_max_len to at most %d", source_max_len, target_max_len, context,
                    max(1, context - target_max_len))


class BatchStream:
    """Micro-batches over epochs, in an order fixed by (seed, epoch); its position is saved and restored.
    With `pack_to`, each micro-batch of `batch_size` examples comes packed into rows of at most that many tokens."""

    def __init__(self, examples: list[Tokenized], batch_size: int, seed: int, group_by_length: bool,
                 pack_to: int | None = None):
        self.examples, self.batch_size, self.seed, self.group = examples, batch_size, seed, group_by_length
        self.pack_to = pack_to
        self.lengths = [e.length for e in examples]
        self.epoch, self.index, self._order = 0, 0, None

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def next(self) -> list[Tokenized]:
        if self._order is None:
            self._order = batch_order(self.lengths, self.batch_size, self.seed, self.epoch, self.group)
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = batch_order(self.lengths, self.batch_size, self.seed, self.epoch, self.group)
        batch = [self.examples[i] for i in self._order[self.index]]
        self.index += 1
        return pack(batch, self.pack_to) if self.pack_to else batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict) -> None:
        self.epoch, self.index, self._order = position["epoch"], position["index"], None
