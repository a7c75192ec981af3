"""Quantize a Hugging Face checkpoint into a `*-bnb-4bit` checkpoint, shard by shard.

The output is what transformers + bitsandbytes `save_pretrained` writes for the same model loaded
with `BitsAndBytesConfig(load_in_4bit=True, ...)`, so both libraries load it without conversion.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import Nf4tuneError
from ..quant import quantize
from .hf import WEIGHTS_INDEX, Checkpoint, iter_tensors, linear_weight_keys, open_checkpoint

# Files that describe the weights themselves; everything else (tokenizer, generation config,
# chat template, README) is copied as it is.
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "*.gguf")


@dataclass
class QuantizeReport:
    """What `quantize_checkpoint` did."""

    out_dir: Path
    quantized: int  # tensors quantized
    kept: int  # tensors copied in their original dtype
    source_bytes: int
    output_bytes: int
    quantized_params: int


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """The `quantization_config` entry transformers writes into config.json for a 4-bit model."""
    from transformers import BitsAndBytesConfig  # pure configuration; does not import bitsandbytes

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return json.loads(json.dumps(cfg.to_dict()))  # enums -> plain strings


def _output_shard_names(ckpt: Checkpoint) -> list[str]:
    n = len(ckpt.shards)
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize every linear weight of the decoder in `model_dir` and write a 4-bit checkpoint to `out_dir`.

    Streams: each source tensor is read, quantized and dropped before the next is read, and each
    output shard is written before the next source shard is opened. `out_dir` appears only once
    complete (it is written to a temporary folder beside it, then renamed). `compute_dtype` is only
    recorded in the config, as the dtype transformers + bitsandbytes will compute in.
    """
    ckpt = open_checkpoint(model_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Nf4tuneError(f"{out_dir} already exists and is not empty; choose a new output folder.")
    if "quantization_config" in ckpt.config:
        method = ckpt.config["quantization_config"].get("quant_method", "?")
        raise Nf4tuneError(f"{ckpt.path} is already quantized ({method}); give the original 16-bit checkpoint.")
    targets = linear_weight_keys(ckpt.config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        report = _write(ckpt, tmp, targets, quant_type, double_quant, blocksize, progress)
        config = dict(ckpt.config)
        config["quantization_config"] = bnb_quantization_config(
            quant_type, double_quant, compute_dtype
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in ckpt.path.iterdir():
            if f.is_file() and f.name != "config.json" and not any(f.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(f, tmp / f.name)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out_dir = out_dir
    return report


def _write(ckpt, tmp, targets, quant_type, double_quant, blocksize, progress) -> QuantizeReport:
    names = _output_shard_names(ckpt)
    weight_map: dict[str, str] = {}
    report = QuantizeReport(tmp, 0, 0, ckpt.nbytes, 0, 0)
    found = set()
    with tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc="quantizing", disable=not progress) as bar:
        for shard, name in zip(ckpt.shards, names):
            out: dict[str, torch.Tensor] = {}
            for key, tensor in iter_tensors(shard):
                if key in targets:
                    q = quantize(tensor, quant_type, blocksize, double_quant, name=key)
                    out.update(q.bnb_state_dict(key))
                    report.quantized += 1
                    report.quantized_params += tensor.numel()
                    found.add(key)
                else:
                    out[key] = tensor
                    report.kept += 1
                bar.update(tensor.nbytes)
                del tensor
            save_file(out, str(tmp / name), metadata={"format": "pt"})
            report.output_bytes += sum(t.nbytes for t in out.values())
            weight_map.update(dict.fromkeys(out, name))
            del out
    if not found:
        raise Nf4tuneError(
            f"no linear layer weights of the {ckpt.config.get('model_type')} architecture were found in "
            f"{ckpt.path}; its tensor names do not match the model transformers builds from config.json."
        )
    if len(names) > 1:
        index = {"metadata": {"total_size": report.output_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return report

