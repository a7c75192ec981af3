"""A LoRA adapter alone as llama.cpp's adapter GGUF, applied at run time on the base model's own export."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import Nf4tuneError
from ..registry import EXPORT_TYPES
from .gguf import require_gguf
from .gguf_export import _atomic_gguf_writer, check_exportable, to_gguf_array

# --type choices for an adapter-only file: float types, as llama.cpp's convert_lora_to_gguf.py writes them (B's rows
# are only a rank wide, narrower than any quantization block).
ADAPTER_EXPORT_TYPES = ("f16", "bf16", "f32")


def check_adapter_type(kind: str) -> None:
    """Refuse a --type an adapter-only GGUF is not written in, with a sentence."""
    if kind not in ADAPTER_EXPORT_TYPES:
        raise Nf4tuneError(f"an adapter-only GGUF is written as {', '.join(ADAPTER_EXPORT_TYPES)}, not --type {kind}; "
                           "llama.cpp applies it on a base GGUF of any type.")


def llama_cpp_lora_alpha(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """adapter.lora.alpha for llama.cpp, which scales each B @ A by alpha / rank: the one alpha that gives the
    adapter's own factor (`pairs`: module -> (A, B, PEFT's scaling)), alpha itself for plain LoRA, alpha * sqrt(r)
    for rank-stabilized LoRA's alpha / sqrt(r). Modules whose factor differs get the difference in B (write_lora_gguf)."""
    a, _, scaling = next(iter(pairs.values()))
    return scaling * a.shape[0]


def write_lora_gguf(out_path: Path, config: dict, pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                    kind: str, name: str) -> int:
    """Write a LoRA adapter (`pairs`: module name -> (A, B, PEFT's scaling)) for a base model of `config` as the LoRA
    GGUF llama.cpp applies on the base's own GGUF (`llama-cli -m base.gguf --lora adapter.gguf`), as its
    convert_lora_to_gguf.py writes one: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and per
    module `<llama.cpp name>.lora_a` (A, rank x in) and `.lora_b` (B, out x rank, its rows in the layout the base's
    weight has there: Q/K in llama.cpp's rotary order). Atomic, as write_gguf. Returns the tensor count."""
    gguf = require_gguf()
    check_adapter_type(kind)
    plan = check_exportable(config, kind)
    alpha = llama_cpp_lora_alpha(pairs)
    count = 0
    with _atomic_gguf_writer(Path(out_path), plan.arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, (a, b, scaling) in pairs.items():
            gguf_name = plan.gguf_name(f"{module}.weight")
            if gguf_name is None:
                raise Nf4tuneError(f"the adapter trains {module}, which llama.cpp's {plan.arch} models do not hold as a "
                                   "weight of their own, so it cannot be written as a llama.cpp adapter; export the "
                                   "merged model instead.")
            ratio = scaling / (alpha / a.shape[0])  # this module's factor over llama.cpp's alpha / rank
            if not math.isclose(ratio, 1.0, rel_tol=1e-6):
                b = b.float() * ratio
            for suffix, w in ((".lora_a", a), (".lora_b", plan.layout(gguf_name, b))):
                array, qtype = to_gguf_array(gguf_name + suffix, w, EXPORT_TYPES[kind][0])
                writer.add_tensor(gguf_name + suffix, array, raw_dtype=qtype)
                count += 1
    return count
