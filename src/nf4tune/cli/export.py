"""`nf4tune export`: a model (with its adapter merged in) as a GGUF file for llama.cpp, Ollama or LM Studio."""

from __future__ import annotations

import argparse

from ..registry import EXPORT_TYPES, UNSUPPORTED_TYPES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model, with its adapter merged in, as a GGUF file (llama.cpp, Ollama)",
        description="Merge a LoRA adapter into the base model's original weights (the dequantized weights of a 4-bit "
        "or GGUF base) and write one GGUF file that llama.cpp loads: its tensor names and layout, the tokenizer and "
        "chat template. Quantized types are made by the gguf package's own quantizers. With --adapter-only, the adapter "
        "alone as a llama.cpp LoRA GGUF instead, applied at run time on BASE's own export.",
    )
    p.add_argument("base", help="base model: folder, Hub id, tiny-random:NAME or .gguf file")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--adapter", help="adapter folder to merge in (nf4tune or PEFT format)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the --adapter alone as a llama.cpp LoRA GGUF (f16, bf16 or f32), to apply on BASE's own "
                        "GGUF export: llama-cli -m base.gguf --lora OUT.gguf")
    p.add_argument("--type", dest="kind", default="f16", choices=list(EXPORT_TYPES) + list(UNSUPPORTED_TYPES),
                   help="tensor type of the weights (default f16); q4_k_m is llama.cpp's Q4_K/Q6_K mix; other K-quants "
                        "need llama.cpp's llama-quantize afterwards")
    p.add_argument("--name", help="model name in the file's metadata (default: the adapter's or model's folder name)")
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile beside it (chat template, stop tokens)")
    p.add_argument("--dequantized", action="store_true",
                   help="merge into the NF4-dequantized weights the adapter trained against (the exact trained function)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..models.export import export_adapter_gguf, export_gguf

    if args.adapter_only:
        _check_adapter_only(args)
        report = export_adapter_gguf(args.base, args.out, args.adapter, args.kind, args.name)
        print(f"wrote {report.path}: {report.tensors} tensors, {report.kind} LoRA adapter; apply it with "
              f"`llama-cli -m BASE.gguf --lora {report.path}` (BASE.gguf: `nf4tune export {args.base} BASE.gguf`)")
        return 0
    report = export_gguf(args.base, args.out, args.adapter, args.kind, args.name, args.ollama, args.dequantized)
    print(f"wrote {report.path}: {report.tensors} tensors, {report.kind}")
    if report.modelfile is not None:
        print(f"wrote {report.modelfile}: run `ollama create NAME -f {report.modelfile}`")
    return 0


def _check_adapter_only(args: argparse.Namespace) -> None:
    from ..errors import Nf4tuneError

    if args.adapter is None:
        raise Nf4tuneError("--adapter-only writes the adapter alone: name it with --adapter ADAPTER_DIR.")
    if args.ollama or args.dequantized:
        flag = "--ollama" if args.ollama else "--dequantized"
        raise Nf4tuneError(f"{flag} applies to a merged export; an adapter-only GGUF goes on the base's own GGUF as it is.")
