"""`nf4tune export`: a base model with its adapter merged in, written as a GGUF file for llama.cpp / Ollama; or the
adapter alone, as llama.cpp's LoRA GGUF applied at run time on the base's own export."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.gguf_export import check_export_type, check_exportable, ollama_modelfile, write_gguf
from ..checkpoint.gguf_lora import check_adapter_type, write_lora_gguf
from ..checkpoint.hf import open_checkpoint, resolve
from ..errors import Nf4tuneError
from ..layers.linear4bit import lora_scaling
from .adapters import read_adapter
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
    if ckpt.gguf is not None:
        _check_gguf_has_no_experts(ckpt.gguf)
    _check_no_expert_lora(adapter)
    tokenizer = _tokenizer(ckpt, adapter)
    adapter_has_tokenizer = adapter is not None and tokenizer is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    source_gguf = ckpt.gguf if ckpt.gguf is not None and not adapter_has_tokenizer else None
    name = name or (Path(adapter).name if adapter is not None else Path(str(base).rstrip("/")).stem)
    tensors = ((key, t) for _, key, t in merged_tensors(base, adapter, dequantized, progress=progress, desc="exporting"))
    config = merged_config(ckpt.config, adapter)  # the vocabulary grown by the tokens an adapter added
    # about the base's size: what a full disk's sentence asks to free (a 4-bit base's f16 export is larger)
    count = write_gguf(out_path, config, tensors, kind, name, tokenizer=tokenizer, source_gguf=source_gguf,
                       expected_bytes=ckpt.nbytes)
    modelfile = None
    if ollama:
        template = getattr(tokenizer, "chat_template", None)
        modelfile = out_path.with_name("Modelfile")
        text = ollama_modelfile(out_path, tokenizer, template)
        tmp = modelfile.with_name(f".Modelfile.{os.getpid()}.partial")
        tmp.write_text(text)
        os.replace(tmp, modelfile)
    return ExportReport(out_path, count, kind, modelfile)


def export_adapter_gguf(
    base: str | Path,
    out_path: str | Path,
    adapter: str | Path,
    kind: str = "f16",
    name: str | None = None,
) -> ExportReport:
    """Write `adapter` alone as a llama.cpp LoRA GGUF (see `write_lora_gguf`) to apply on `base`'s own GGUF export:
    `llama-cli -m base.gguf --lora OUT.gguf`. `base` (its config only: no weights are read) gives the architecture,
    tensor names and layout. An adapter that adds tokens or trains whole embedding rows has no llama.cpp LoRA form."""
    check_adapter_type(kind)
    out_path = _gguf_path(out_path)
    ckpt = open_checkpoint(resolve(base))
    config = _unquantized(ckpt.config)
    check_exportable(config, kind)
    _check_no_expert_lora(adapter)
    lora, pairs, saved = read_adapter(adapter)
    if saved:
        raise Nf4tuneError(f"the adapter in {adapter} trains rows of {', '.join(sorted(saved))}, which a llama.cpp LoRA "
                           "file cannot carry; export the merged model instead (without --adapter-only).")
    if not pairs:
        raise Nf4tuneError(f"the adapter in {adapter} has no LoRA weights to write.")
    _check_fits_base(config, pairs, adapter, ckpt.path)
    alpha, rslora = lora.get("lora_alpha", 8), bool(lora.get("use_rslora"))
    scaled = {module: (pair["A"], pair["B"], lora_scaling(alpha, pair["A"].shape[0], rslora)) for module, pair in pairs.items()}
    count = write_lora_gguf(out_path, config, scaled, kind, name or Path(str(adapter).rstrip("/")).name)
    return ExportReport(out_path, count, kind, None)


def _check_gguf_has_no_experts(path: Path) -> None:
    """Refuse a mixture-of-experts GGUF base: transformers' GGUF reader, which nf4tune reads GGUF files through, loses
    its experts (Mixtral comes back as a dense Llama, Qwen-MoE without its experts' size), so the export would be wrong."""
    from ..checkpoint.gguf import field

    arch = field(path, "general.architecture")
    if field(path, f"{arch}.expert_count"):
        raise Nf4tuneError(f"{path} is a mixture-of-experts model, whose experts nf4tune cannot read back from a GGUF file "
                           "yet; export it from its Hugging Face checkpoint.")


def _check_no_expert_lora(adapter) -> None:
    """Refuse an adapter with LoRA on a mixture-of-experts model's experts (PEFT's target_parameters: LoRA on 3-D
    parameters, not on nn.Linear modules), which the export cannot merge or write yet."""
    config = Path(adapter) / "adapter_config.json" if adapter is not None else None
    if config is None or not config.is_file():
        return  # no adapter, or read_adapter's sentence about the folder
    try:
        params = json.loads(config.read_text()).get("target_parameters")
    except (OSError, ValueError, AttributeError):
        return  # read_adapter says what is wrong with the file
    if params:
        raise Nf4tuneError(f"the adapter in {adapter} puts LoRA on {', '.join(params)} (PEFT's target_parameters), which "
                           "nf4tune export cannot merge or write yet; merge it with PEFT (merge_and_unload, then "
                           "save_pretrained) and export that folder.")


def _check_fits_base(config: dict, pairs: dict, adapter, base_path) -> None:
    """Each adapter pair fits the base's weight it targets (the shapes from a model built on the meta device)."""
    from ..checkpoint.architecture import build_meta_model

    model = build_meta_model(config)
    for module, pair in pairs.items():
        try:
            shape = list(model.get_submodule(module).weight.shape)
        except AttributeError:
            raise Nf4tuneError(f"the adapter in {adapter} targets {module}, which {base_path} does not have; it was "
                               "trained on another base model.") from None
        a, b = pair["A"], pair["B"]
        if shape != [b.shape[0], a.shape[1]] or a.shape[0] != b.shape[1]:
            raise Nf4tuneError(f"the adapter in {adapter} does not fit {base_path}: {module}.weight is {shape} but the "
                               f"adapter has A {list(a.shape)}, B {list(b.shape)}; it was trained on another base model.")
