"""`nf4tune export`: a base model with its adapter merged in, written as a GGUF file for llama.cpp / Ollama."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.gguf_export import check_export_type, check_exportable, ollama_modelfile, write_gguf
from ..checkpoint.hf import open_checkpoint, resolve
from ..errors import Nf4tuneError
from .merge import merged_config, merged_tensors


@dataclass
class ExportReport:
    path: Path
    tensors: int
    kind: str
    modelfile: Path | None


def _tokenizer(ckpt, adapter):
    """The tokenizer the exported model speaks: the adapter's when it saved one, else the base model's."""
    from transformers import AutoTokenizer

    for folder in ([Path(adapter)] if adapter is not None else []) + ([ckpt.path] if ckpt.gguf is None else []):
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(folder)
    if ckpt.gguf is not None:
        from ..checkpoint.gguf import gguf_tokenizer

        return gguf_tokenizer(ckpt.gguf)
    return None


def _gguf_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    if out_path.suffix != ".gguf":
        raise Nf4tuneError(f"{out_path} does not end in .gguf; name the output file OUT.gguf.")
    if out_path.is_dir():
        raise Nf4tuneError(f"{out_path} is a folder; give the path of the .gguf file to write.")
    return out_path


def _unquantized(config: dict) -> dict:
    """A 4-bit checkpoint's config as its 16-bit model's (what the export writes)."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def export_gguf(
    base: str | Path,
    out_path: str | Path,
    adapter: str | Path | None = None,
    kind: str = "f16",
    name: str | None = None,
    ollama: bool = False,
    dequantized: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Merge `adapter` (if any) into `base`'s original weights (dequantized for a 4-bit or GGUF base) and
    write one GGUF file of type `kind` (see `EXPORT_TYPES`), tensor by tensor; with `ollama`, a Modelfile beside it."""
    check_export_type(kind)
    out_path = _gguf_path(out_path)
    ckpt = open_checkpoint(resolve(base))
    check_exportable(_unquantized(ckpt.config), kind)  # a refusal before any tokenizer, adapter or weight is read
    tokenizer = _tokenizer(ckpt, adapter)
    adapter_has_tokenizer = adapter is not None and tokenizer is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    source_gguf = ckpt.gguf if ckpt.gguf is not None and not adapter_has_tokenizer else None
    name = name or (Path(adapter).name if adapter is not None else Path(str(base).rstrip("/")).stem)
    tensors = ((key, t) for _, key, t in merged_tensors(base, adapter, dequantized, progress=progress, desc="exporting"))
    config = merged_config(ckpt.config, adapter)  # the vocabulary grown by the tokens an adapter added
    count = write_gguf(out_path, config, tensors, kind, name, tokenizer=tokenizer, source_gguf=source_gguf)
    modelfile = None
    if ollama:
        template = getattr(tokenizer, "chat_template", None)
        modelfile = out_path.with_name("Modelfile")
        text = ollama_modelfile(out_path, tokenizer, template)
        tmp = modelfile.with_name(f".Modelfile.{os.getpid()}.partial")
        tmp.write_text(text)
        os.replace(tmp, modelfile)
    return ExportReport(out_path, count, kind, modelfile)
