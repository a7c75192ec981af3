"""Quantize a Hugging Face checkpoint into a `*-bnb-4bit` checkpoint, shard by shard.

The output is what transformers + bitsandbytes `save_pretrained` writes for the same model loaded
with `BitsAndBytesConfig(load_in_4bit=True, ...)`, so both libraries load it without conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import dispatch  # noqa: F401  (registers the 4-bit ops' CPU and CUDA kernels)
from ..errors import Nf4tuneError
from ..outputs import check_output
from ..quant import quantize
from .architecture import build_meta_model, quantizable_linears
from .expert_keys import KeyConverter
from .gguf import companion_files
from .hf import iter_tensors, open_checkpoint
from .writer import CheckpointWriter


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


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    overwrite: bool = False,
) -> QuantizeReport:
    """Quantize every linear weight of the decoder in `model_dir` and write a 4-bit checkpoint to `out_dir`.

    A mixture of experts' fused expert parameters (transformers' names: per-expert checkpoint tensors are
    fused as transformers fuses them) are quantized too, each whole, flattened row-major, in the same
    bitsandbytes layout. transformers + bitsandbytes keep experts in 16-bit and cannot read these; nf4tune
    loads them.

    Streams: each source tensor is read, quantized and dropped before the next is read, and each
    output shard is written before the next source shard is opened. `out_dir` appears only once
    complete. `compute_dtype` is only recorded in the config, as the dtype transformers +
    bitsandbytes will compute in. `out_dir` may be neither the source nor a folder holding it; an
    existing one is replaced only with `overwrite`.
    """
    check_output(out_dir, [("the model to quantize", model_dir)], overwrite)
    ckpt = open_checkpoint(model_dir)
    if "quantization_config" in ckpt.config:
        method = ckpt.config["quantization_config"].get("quant_method", "?")
        raise Nf4tuneError(f"{ckpt.path} is already quantized ({method}); give the original 16-bit checkpoint.")
    with companion_files(ckpt) as source, CheckpointWriter(out_dir, source, len(ckpt.shards), overwrite,
                                                                 ckpt.nbytes // 3) as writer:
        meta = build_meta_model(ckpt.config)
        targets = {f"{name}.weight" for name in quantizable_linears(meta)}
        keys = KeyConverter(meta)
        targets |= {name for name, p in meta.named_parameters() if p.dim() == 3 and keys.converts_experts}
        del meta
        report = QuantizeReport(Path(out_dir), 0, 0, ckpt.nbytes, 0, 0)
        with tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc=f"quantizing {ckpt.path.name}", disable=not progress) as bar:
            shards_read = 0
            for shard in ckpt.shards:
                out: dict[str, torch.Tensor] = {}
                for source_key, source in iter_tensors(shard):
                    bar.update(source.nbytes)
                    for key, tensor in keys.feed(source_key, source):
                        if key in targets:
                            q = quantize(tensor, quant_type, blocksize, double_quant, name=key)
                            out.update(q.bnb_state_dict(key))
                            report.quantized += 1
                            report.quantized_params += tensor.numel()
                        else:
                            out[key] = tensor
                            report.kept += 1
                        del tensor
                    del source
                if shard == ckpt.shards[-1]:
                    for key, tensor in keys.finish(ckpt.path):
                        out[key] = tensor
                        report.kept += 1
                writer.write_shard(out)
                del out
                shards_read += shard.stat().st_size
                bar.update(shards_read - bar.n)  # file sizes include headers: reach the total
        if not report.quantized:
            raise Nf4tuneError(
                f"no linear layer weights of the {ckpt.config.get('model_type')} architecture were found in "
                f"{ckpt.path}; its tensor names do not match the model transformers builds from config.json."
            )
        config = dict(ckpt.config)
        config["quantization_config"] = bnb_quantization_config(quant_type, double_quant, compute_dtype)
        writer.finish(config)
    report.output_bytes = writer.nbytes
    return report
