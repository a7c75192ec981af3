"""Merging a LoRA adapter into its base model's 16-bit weights: W' = W + scaling * B @ A.

By default the adapter is merged into the base checkpoint's original 16-bit weights (a clean merge,
what PEFT's `merge_and_unload` gives on a 16-bit model). With `dequantized=True` it is merged into
the 4-bit weights it was trained against, dequantized: the exact function the adapter learned.
A 4-bit (`*-bnb-4bit`) base has no original weights, so it is always merged dequantized.

A mixture of experts' per-expert checkpoint tensors are fused as transformers fuses them on load
(checkpoint/expert_keys.py) and written fused, 16-bit, with the per-expert adapters merged in: the
tensors transformers' model holds, under its names, which it loads as they are.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .. import dispatch  # noqa: F401  (registers the 4-bit ops' CPU and CUDA kernels)
from ..checkpoint.bnb4bit import QuantizedWeightAssembler
from ..checkpoint.gguf import companion_files
from ..checkpoint.hf import iter_tensors, open_checkpoint, resolve
from ..checkpoint.writer import CheckpointWriter
from ..errors import Nf4tuneError
from ..layers.linear4bit import lora_scaling
from ..outputs import check_output
from ..quant import quantize
from .adapters import VocabRows, read_adapter

log = logging.getLogger("nf4tune")


@dataclass
class MergeReport:
    out_dir: Path
    merged: int
    dequantized: bool


def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """w + (B @ A) * scaling, computed in float32 and rounded once to w's dtype (as PEFT merges)."""
    delta = (b.float() @ a.float()) * scaling
    return (w.float() + delta).to(w.dtype)


def merged_experts(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """A fused (experts, ...) parameter plus its per-expert adapter (PEFT's ParamWrapper layout), with PEFT's
    delta (its einsum) computed in float32 and rounded once to w's dtype."""
    experts = w.shape[0]
    a = a.float().reshape(experts, -1, a.shape[-1])  # (experts, r, in)
    b = b.float().reshape(b.shape[0], -1, experts)  # (out, r, experts)
    delta = torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", b, a) * scaling
    return (w.float() + delta).to(w.dtype)


def _expert_targets(ckpt, pairs: dict, config: dict, adapter) -> tuple[object | None, dict]:
    """(a KeyConverter fusing `ckpt`'s per-expert tensors, {fused key: (pair, transposed)}) for a MoE base;
    (None, {}) for a dense one. The adapter's expert pairs are taken out of `pairs`."""
    if ckpt.gguf is not None:
        return None, {}
    from ..checkpoint.architecture import build_meta_model
    from ..checkpoint.expert_keys import KeyConverter
    from ..layers.experts4bit import swap_experts
    from .adapters import _expert_pairs

    meta = build_meta_model(ckpt.config)
    keys = KeyConverter(meta)
    if not keys.converts_experts:
        return None, {}
    swap_experts(meta, torch.float32)
    found = _expert_pairs(meta, pairs, config, adapter) if pairs else {}
    return keys, {name: (pair, weight.transposed) for name, (weight, pair) in found.items()}


def _header_shapes(ckpt) -> dict[str, list[int]]:
    """Every tensor's shape, read from the safetensors headers only."""
    shapes = {}
    for shard in ckpt.shards:
        with safe_open(str(shard), framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


def _check_shapes(ckpt, shapes: dict, pairs: dict, adapter_dir) -> None:
    for name, pair in pairs.items():
        shape = shapes.get(f"{name}.weight")
        expected = [pair["B"].shape[0], pair["A"].shape[1]]
        if shape is None:
            raise Nf4tuneError(f"the adapter in {adapter_dir} targets {name}, which {ckpt.path} does not have; "
                               "it was trained on another base model.")
        if list(shape) != expected:
            raise Nf4tuneError(f"the adapter in {adapter_dir} does not fit {ckpt.path}: {name}.weight is {list(shape)} "
                               f"but the adapter makes {expected}; it was trained on another base model.")


def _vocab_targets(saved: dict[str, VocabRows], shapes: dict, adapter, path) -> dict[str, VocabRows]:
    """The checkpoint keys an adapter's vocabulary rows go into. A tied model's checkpoint has no head
    weight: the head's rows (the embedding's) are then left out."""
    targets = {f"{name}.weight": rows for name, rows in saved.items() if f"{name}.weight" in shapes}
    if saved and not targets:
        raise Nf4tuneError(f"the adapter in {adapter} sets rows of {', '.join(sorted(saved))}, which {path} does not "
                           "have; it was trained on another base model.")
    return targets


def with_rows(weight: torch.Tensor, rows: VocabRows) -> torch.Tensor:
    """`weight` (vocabulary x hidden) grown to hold `rows` and with them written in: the vocabulary of a
    model whose adapter added tokens (rows it does not name start at the mean of the old ones, as in training)."""
    if rows.values.shape[1:] != weight.shape[1:]:
        raise Nf4tuneError(f"the adapter's token rows are {list(rows.values.shape)} but the base's vocabulary matrix "
                           f"is {list(weight.shape)}; it was trained on another base model.")
    size = max(rows.size, weight.shape[0])
    out = weight.new_empty((size, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    out[weight.shape[0]:] = weight.float().mean(0).to(weight.dtype)
    rows.apply(out)
    return out


def vocab_size_of(adapter: str | Path | None) -> int | None:
    """The vocabulary size a model with `adapter` has when the adapter adds tokens, else None."""
    if adapter is None:
        return None
    _, _, saved = read_adapter(adapter)
    return max((rows.size for rows in saved.values()), default=None)


def merged_config(config: dict, adapter: str | Path | None) -> dict:
    """The base's config.json for the merged model: 16-bit, its vocabulary grown by the adapter's tokens."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    size = vocab_size_of(adapter)
    if size is not None and size > out.get("vocab_size", 0):
        out["vocab_size"] = size
    return out


def merged_tensors(
    base: str | Path,
    adapter: str | Path | None,
    dequantized: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    progress: bool = True,
    desc: str = "merging",
) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Yield (shard index, key, tensor) of `base` with `adapter` merged in (or `base` alone when
    `adapter` is None: 4-bit weights dequantized), one tensor at a time in checkpoint order.

    `quant_type`, `double_quant` and `blocksize` say how the 4-bit weights the adapter trained
    against were made (used with `dequantized=True` on a 16-bit base). A GGUF base's weights are
    its dequantized tensors.
    """
    ckpt = open_checkpoint(resolve(base))
    if adapter is not None:
        config, pairs, saved = read_adapter(adapter)
    else:
        config, pairs, saved = {}, {}, {}
    qcfg = ckpt.config.get("quantization_config")
    prequantized = qcfg is not None
    if prequantized and not (qcfg.get("quant_method") == "bitsandbytes" and qcfg.get("load_in_4bit")):
        raise Nf4tuneError(f"{ckpt.path} is quantized with {qcfg.get('quant_method')}; merge needs a 16-bit or 4-bit bnb base.")
    if ckpt.gguf is not None:
        from ..checkpoint.gguf import gguf_shapes

        shapes = gguf_shapes(ckpt.gguf)
    else:
        shapes = _header_shapes(ckpt)
    quantized = {k for k in shapes if f"{k}.absmax" in shapes}  # 4-bit weights of a bnb checkpoint
    keys, expert_targets = _expert_targets(ckpt, pairs, config, adapter)
    if prequantized:
        log.info("nf4tune: %s is 4-bit; merging into its dequantized weights.", ckpt.path)
        dequantized = True
    else:
        _check_shapes(ckpt, shapes, pairs, adapter)
    targets = {f"{name}.weight": pair for name, pair in pairs.items()}
    vocab = _vocab_targets(saved, shapes, adapter, ckpt.path)

    merged = 0
    assembler = QuantizedWeightAssembler(quantized)

    def converted(shard, last: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in iter_tensors(shard):
            bar.update(tensor.nbytes)
            yield from keys.feed(key, tensor) if keys is not None else [(key, tensor)]
        if last and keys is not None:
            yield from keys.finish(ckpt.path)

    with tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for index, shard in enumerate(ckpt.shards):
            for key, tensor in converted(shard, index == len(ckpt.shards) - 1):
                if assembler.owner(key):
                    done = assembler.add(key, tensor)
                    if done is None:
                        continue
                    key, tensor = done[0], done[1].dequantize()
                elif (key in targets or key in expert_targets) and dequantized:
                    tensor = quantize(tensor, quant_type, blocksize, double_quant, name=key).dequantize()
                if key in expert_targets:
                    pair, transposed = expert_targets[key]
                    tensor = merged_experts(tensor, pair["A"], pair["B"],
                                            lora_scaling(config.get("lora_alpha", 8), pair["A"].shape[0] // tensor.shape[0],
                                                         bool(config.get("use_rslora"))), transposed)
                    merged += 1
                if key in targets:
                    pair = targets[key]
                    if list(tensor.shape) != [pair["B"].shape[0], pair["A"].shape[1]]:
                        raise Nf4tuneError(f"the adapter in {adapter} does not fit {ckpt.path}: {key} is "
                                           f"{list(tensor.shape)}; it was trained on another base model.")
                    tensor = merged_weight(tensor, pair["A"], pair["B"],
                                           lora_scaling(config.get("lora_alpha", 8), pair["A"].shape[0],
                                                        bool(config.get("use_rslora"))))
                    merged += 1
                if key in vocab:
                    tensor = with_rows(tensor, vocab[key])
                yield index, key, tensor
        bar.update(bar.total - bar.n)  # sizes counted by tensor miss the files' headers: reach the total
    if assembler.pending:
        raise Nf4tuneError(f"{ckpt.path} has incomplete 4-bit weights ({next(iter(assembler.pending))}); "
                           "the checkpoint is damaged.")
    if merged != len(targets) + len(expert_targets):
        raise Nf4tuneError(f"{ckpt.path} lacks {len(targets) + len(expert_targets) - merged} weight(s) the adapter targets; "
                           "it was trained on another base model.")


@contextlib.contextmanager
def _with_adapter_tokenizer(files: Path, adapter: str | Path) -> Iterator[Path]:
    """The files a merged checkpoint copies: the base's, with the tokenizer the adapter saved (one
    with the tokens it added) in place of the base's."""
    from ..checkpoint.hf import has_tokenizer

    if not has_tokenizer(Path(adapter)):
        yield files
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for f in files.iterdir():
            if f.is_file():
                shutil.copyfile(f, Path(tmp) / f.name)
        AutoTokenizer.from_pretrained(adapter).save_pretrained(tmp)
        yield Path(tmp)


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out_dir: str | Path,
    dequantized: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    progress: bool = True,
    overwrite: bool = False,
) -> MergeReport:
    """Write `base` with `adapter` merged in as a standard 16-bit safetensors checkpoint in `out_dir`.

    Streams shard by shard. `quant_type`, `double_quant` and `blocksize` say how the 4-bit weights
    the adapter trained against were made (used with `dequantized=True` on a 16-bit base). A GGUF
    base is written as its dequantized (float32) tensors, with its tokenizer. `out_dir` may be
    neither input nor a folder holding one; an existing one is replaced only with `overwrite`, and
    only once the new folder is complete.
    """
    check_output(out_dir, [("the base model", base), ("the adapter", adapter)], overwrite)
    ckpt = open_checkpoint(resolve(base))
    _, pairs, _ = read_adapter(adapter)
    dequantized = dequantized or ckpt.config.get("quantization_config") is not None
    expected = ckpt.nbytes * (4 if dequantized else 1)  # a 4-bit base is written back in 16 bits
    with companion_files(ckpt) as base_files, _with_adapter_tokenizer(base_files, adapter) as source, \
            CheckpointWriter(out_dir, source, len(ckpt.shards), overwrite, expected) as writer:
        out: dict[str, torch.Tensor] = {}
        current = 0
        for index, key, tensor in merged_tensors(base, adapter, dequantized, quant_type, double_quant, blocksize, progress):
            if index != current:
                writer.write_shard(out)
                out, current = {}, index
            out[key] = tensor
        writer.write_shard(out)
        writer.finish(merged_config(ckpt.config, adapter))
    return MergeReport(Path(out_dir), len(pairs), dequantized)
