"""Writing GGUF files that llama.cpp loads: the export plan checked from the config (gguf_arch.py: tensor names
and layout, model metadata), the tokenizer and chat template (gguf_vocab.py), each tensor in its ggml type, made by
the `gguf` package's own quantizers or nf4tune's (gguf_quants.py); and an Ollama Modelfile beside the file.

The file is written to a temporary name beside the output (tensor data spooled to an unnamed
temporary file as each tensor arrives, so no more than one tensor is in memory) and renamed into
place only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import Nf4tuneError
from ..outputs import OutOfSpace, is_out_of_space

# --type choices: (ggml type of 2-D weights, llama.cpp file type). One registry.
from ..registry import EXPORT_TYPES, UNSUPPORTED_TYPES
from .gguf import require_gguf
from .gguf_arch import ExportPlan
from .gguf_vocab import _VOCABULARY_TENSORS, add_hf_tokenizer, check_vocabulary_rows, copy_tokenizer_fields

log = logging.getLogger("nf4tune")


def check_export_type(kind: str) -> None:
    """Refuse a --type the exporter cannot write, with a sentence saying what to do instead."""
    if kind in EXPORT_TYPES:
        return
    if kind in UNSUPPORTED_TYPES:
        raise Nf4tuneError(
            f"--type {kind} is not supported: nf4tune has no {UNSUPPORTED_TYPES[kind]} quantizer; export "
            f"--type f16 and run llama.cpp's `llama-quantize OUT.gguf OUT-{kind}.gguf {UNSUPPORTED_TYPES[kind]}`.")
    raise Nf4tuneError(f"unknown --type {kind!r}; supported: {', '.join(EXPORT_TYPES)}.")


# Matrices llama.cpp's converter (and llama-quantize) keeps in float32 at every --type: the expert routers, whose
# small differences would change which experts a token goes to.
_FLOAT32_WEIGHTS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def tensor_type(gguf_name: str, w: torch.Tensor, kind: str, n_layers: int, has_output: bool) -> str:
    """The ggml type of one tensor for --type `kind`: 1-D tensors F32 (llama.cpp keeps norms and biases so),
    Q4_K_M's per-tensor mix (gguf_quants.q4_k_m_type), else `kind`'s type; a k-quant whose rows do not fill
    256-weight super-blocks falls back as llama.cpp's does (Q6_K -> Q8_0)."""
    from .gguf_quants import QK_K, q4_k_m_type

    if w.dim() < 2 or gguf_name.endswith(_FLOAT32_WEIGHTS):
        return "F32"
    qtype = EXPORT_TYPES[kind][0]
    if qtype == "Q4_K_M":
        return q4_k_m_type(gguf_name, n_layers, w.shape[-1], has_output)
    if qtype == "Q6_K" and w.shape[-1] % QK_K:
        return "Q8_0"
    return qtype


def to_gguf_array(gguf_name: str, w: torch.Tensor, qtype: str):
    """(numpy array, ggml type or None) for one tensor in ggml type `qtype` (see `tensor_type`); a weight whose
    rows do not fill whole quantization blocks stays float16."""
    gguf = require_gguf()
    from .gguf_quants import quantize

    w = w.detach().to(torch.float32).contiguous()
    if qtype == "F32":
        return w.numpy(), None
    if qtype == "F16":
        return w.to(torch.float16).numpy(), None
    ggml_type = getattr(gguf.GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    if w.shape[-1] % block:
        log.warning("nf4tune: %s has rows of %d, not a multiple of %d; written as F16.", gguf_name, w.shape[-1], block)
        return w.to(torch.float16).numpy(), None
    return quantize(w.numpy(), qtype), ggml_type


def check_exportable(config: dict, kind: str) -> "ExportPlan":
    """The export plan for a model of `config` at --type `kind`, or the one-sentence reason llama.cpp could not run
    it; from the config alone, so a refusal comes before any tokenizer or weight is read."""
    check_export_type(kind)
    plan = ExportPlan.for_config(config)
    if EXPORT_TYPES[kind][0] == "Q4_K_M" and plan.spec.gguf_fused_qkv:
        raise Nf4tuneError(f"llama.cpp's Q4_K_M puts {config['model_type']}'s fused attn_qkv matrices in Q5_K, which nf4tune "
                           "cannot make; export --type f16 and run llama.cpp's `llama-quantize OUT.gguf OUT-q4_k_m.gguf Q4_K_M`.")
    if EXPORT_TYPES[kind][0] == "Q4_K_M" and plan.n_experts:
        raise Nf4tuneError("llama.cpp's Q4_K_M chooses the types of a mixture-of-experts model's tensors by rules nf4tune "
                           "does not follow yet; export --type f16 and run llama.cpp's `llama-quantize OUT.gguf "
                           "OUT-q4_k_m.gguf Q4_K_M`.")
    return plan


@contextlib.contextmanager
def _atomic_gguf_writer(out_path: Path, arch: str, expected_bytes: int = 0) -> Iterator:
    """A GGUFWriter whose file appears at `out_path` only once complete: written to a temporary name beside it, the
    tensor data spooled to an unnamed file there (not /tmp: a large model may not fit), renamed at the end; nothing is
    left behind on an error. A full disk is one sentence (`OutOfSpace`) asking for about `expected_bytes` (or what
    was written by then, if more)."""
    gguf = require_gguf()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, arch, use_temp_file=True)
    writer.temp_file = tempfile.TemporaryFile(dir=out_path.parent)
    needed = 0
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()  # the tensor table, then the spooled data
        writer.close()
        os.replace(partial, out_path)
        return
    except BaseException as e:
        # asked before the space is freed; the file's size so far, spooled data included, is what was wanted
        full = isinstance(e, Exception) and is_out_of_space(e, out_path.parent)
        needed = max(expected_bytes, _bytes_written(partial, writer.temp_file)) if full else 0
        writer.close()
        writer.temp_file.close()
        partial.unlink(missing_ok=True)
        if not full:
            raise
    # raised outside the handler: the failed write's exception would keep the deleted files (and their space) held
    raise OutOfSpace(out_path, needed, out_path.parent, "output file", "nothing was replaced.")


def _bytes_written(partial: Path, spool) -> int:
    """Bytes a half-written GGUF holds so far: its file and the tensor data spooled beside it."""
    try:
        return partial.stat().st_size + os.fstat(spool.fileno()).st_size
    except (OSError, ValueError):
        return 0


def write_gguf(
    out_path: Path,
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    kind: str,
    name: str,
    tokenizer=None,
    source_gguf: Path | None = None,
    expected_bytes: int = 0,
) -> int:
    """Write `tensors` (transformers keys, merged 16/32-bit weights, consumed one at a time) as a GGUF
    llama.cpp loads; the tokenizer from `source_gguf`'s metadata when given, else from `tokenizer`, its vocabulary
    padded to the config's vocab_size. Atomic: a temporary file beside `out_path`, renamed when complete; a full
    disk is one sentence asking for about `expected_bytes`.
    Returns the tensor count."""
    plan = check_exportable(config, kind)
    n_vocab = config["vocab_size"]
    with _atomic_gguf_writer(Path(out_path), plan.arch, expected_bytes) as writer:
        plan.add_metadata(writer, name, kind)
        if source_gguf is not None:
            copy_tokenizer_fields(writer, source_gguf, n_vocab)
        elif tokenizer is not None:
            add_hf_tokenizer(writer, tokenizer, n_vocab)
        else:
            raise Nf4tuneError("the base model has no tokenizer; llama.cpp needs one in the GGUF file.")
        count = 0
        has_output = plan.has_output  # llama.cpp's has_output: a separate output.weight
        rows = {}
        for gguf_name, w in plan.named_tensors(tensors):
            if gguf_name in _VOCABULARY_TENSORS:
                rows[gguf_name] = w.shape[0]
            qtype = tensor_type(gguf_name, w, kind, config["num_hidden_layers"], has_output)
            array, qtype = to_gguf_array(gguf_name, plan.layout(gguf_name, w), qtype)
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
            count += 1
        for gguf_name, w in plan.extra_tensors():  # 1-D float32, as llama.cpp's converter writes them
            writer.add_tensor(gguf_name, w.to(torch.float32).numpy())
            count += 1
        check_vocabulary_rows(len(writer.kv_data[0]["tokenizer.ggml.tokens"].value), rows)
        return count


def ollama_modelfile(gguf_path: Path, tokenizer, chat_template: str | None) -> str:
    """An Ollama Modelfile for `gguf_path`: the chat template in Go template syntax (ChatML or Llama-3 style
    recognized; otherwise a plain prompt) and the end-of-turn tokens as stop words."""
    template = chat_template or ""
    stops: list[str] = []
    if "<|im_start|>" in template:
        go = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
              '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
              '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n')
        stops = ["<|im_end|>", "<|im_start|>"]
    elif "<|start_header_id|>" in template:
        go = ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
              '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
              '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>')
        stops = ["<|eot_id|>", "<|start_header_id|>"]
    else:
        go = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}{{ .Response }}"
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{go}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
