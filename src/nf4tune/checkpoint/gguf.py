"""Reading GGUF files (llama.cpp's format) as a checkpoint.

The config and tokenizer are what transformers builds from the GGUF metadata
(`from_pretrained(..., gguf_file=...)`), and the tensors are what transformers' GGUF loader makes of
them: the `gguf` package dequantizes each tensor (to float32, exactly: a Q4_1 value `d * q + m` is
not representable in 16 bits) and transformers' per-family processor undoes llama.cpp's layout (the
Q/K rotary permutation of Llama-style models) and names it. One tensor at a time: the dequantized
model never exists in memory.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import Nf4tuneError

log = logging.getLogger("nf4tune")

GGUF_SUFFIX = ".gguf"


def require_gguf():
    """The `gguf` package, imported on the GGUF path only, or a sentence saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise Nf4tuneError("reading or writing GGUF files needs the gguf package: pip install gguf") from e
    return gguf


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf in a folder that is not a Hugging Face
    checkpoint; None when `path` is neither."""
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(files) > 1:
        raise Nf4tuneError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                           "give the path of the one to use.")
    return files[0] if files else None


def _key(path: Path) -> tuple[str, int, int]:
    # Cached per file version: a file rewritten in place is read again.
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _reader(key: tuple[str, int, int]):
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(key[0])
    except Exception as e:  # gguf raises ValueError / struct errors for damaged files
        raise Nf4tuneError(f"{key[0]} cannot be read as GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "the file may be truncated or corrupt.") from e


def reader(path: Path):
    """The `gguf.GGUFReader` of `path` (memory-mapped; parsed once per process)."""
    return _reader(_key(path))


def field(path: Path, name: str, default=None):
    """One metadata value of the GGUF file (a string, number or list), or `default`."""
    f = reader(path).fields.get(name)
    return default if f is None else f.contents()


class _FieldsWithout:
    """A parsed reader seen without some metadata fields (the model config needs no vocabulary, and
    converting 49k tokens and merges to Python strings takes seconds)."""

    def __init__(self, parsed, drop: set[str]):
        self._parsed = parsed
        self.fields = {k: v for k, v in parsed.fields.items() if k not in drop}

    def __getattr__(self, name):
        return getattr(self._parsed, name)


_VOCABULARY_FIELDS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}


@contextlib.contextmanager
def _parsed_once(path: Path, without_vocabulary: bool = False):
    """Let transformers' GGUF functions reuse this process's parsed reader of `path`.

    They open `gguf.GGUFReader(path)` themselves, and parsing a real vocabulary's metadata takes
    seconds each time; they import the name at call time, so pointing it at the cached reader
    for the duration of the call is enough.
    """
    gguf = require_gguf()
    original = gguf.GGUFReader
    cached = reader(path)
    arch = field(path, "general.architecture")
    if without_vocabulary and f"{arch}.vocab_size" in cached.fields:  # else the vocabulary's length is the size
        cached = _FieldsWithout(cached, _VOCABULARY_FIELDS)
    target = str(path.resolve())

    def open_reader(file, *args, **kwargs):
        return cached if str(Path(file).resolve()) == target else original(file, *args, **kwargs)

    gguf.GGUFReader = open_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@functools.lru_cache(maxsize=4)
def _config(key: tuple[str, int, int]) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from .architecture import to_config

    path = Path(key[0])
    try:
        with _parsed_once(path, without_vocabulary=True):  # what AutoConfig.from_pretrained(..., gguf_file=...) reads
            config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (ValueError, KeyError, NotImplementedError) as e:
        raise Nf4tuneError(f"{path}: transformers cannot build a model config from this GGUF file "
                           f"({str(e).splitlines()[0]}); its architecture may not be supported.") from e
    config = to_config(config).to_dict()
    for k in ("_name_or_path", "_model_name_or_path", "quantization_config", "dtype", "torch_dtype"):
        config.pop(k, None)
    _warn_if_rope_scaled(path)
    return config


def _warn_if_rope_scaled(path: Path) -> None:
    """transformers' GGUF reader, which nf4tune follows, builds plain rotary embeddings and ignores
    llama.cpp's rope scaling (Llama 3.1's `rope_freqs`, Phi-3's long/short factors, `rope.scaling.*`):
    say so once, since the model then differs from the original and from llama.cpp."""
    parsed = reader(path)
    arch = field(path, "general.architecture")
    scaling = field(path, f"{arch}.rope.scaling.type", "none")
    tensors = {t.name for t in parsed.tensors if t.name.startswith(("rope_freqs", "rope_factors"))}
    if scaling in (None, "none") and not tensors:
        return
    what = ", ".join(sorted(tensors) + ([f"rope.scaling.type {scaling}"] if scaling not in (None, "none") else []))
    log.warning("nf4tune: %s holds rope scaling (%s) that transformers' GGUF reader, and so nf4tune, does not "
                "apply: the model computes plain rotary embeddings and its logits differ from the original "
                "model's and llama.cpp's. Load the original Hugging Face checkpoint to keep the scaling.",
                path.name, what)


def gguf_config(path: Path) -> dict:
    """The config dict transformers builds from the GGUF metadata (as config.json would hold it)."""
    return copy.deepcopy(_config(_key(path)))


@functools.lru_cache(maxsize=2)
def _tokenizer(key: tuple[str, int, int]):
    from transformers import AutoTokenizer

    path = Path(key[0])
    try:
        with _parsed_once(path):
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise Nf4tuneError(f"{path}: transformers cannot build a tokenizer from this GGUF file "
                           f"({str(e).splitlines()[0]}).") from e


def gguf_tokenizer(path: Path):
    """The tokenizer transformers builds from the GGUF metadata (a fresh copy each call: training may add tokens)."""
    return copy.deepcopy(_tokenizer(_key(path)))


@functools.lru_cache(maxsize=4)
def _weights_map_cached(key: tuple[str, int, int]):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .architecture import build_meta_model

    path = Path(key[0])
    config = _config(key)
    arch = field(path, "general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=copy.deepcopy(config))
    return processor, _gguf_to_hf_names(build_meta_model(copy.deepcopy(config)), processor, arch)


def _gguf_to_hf_names(model, processor, arch: str) -> dict[str, str]:
    """{gguf tensor name: transformers key}, as transformers' `get_gguf_hf_weights_map` computes it
    (each module's keys through gguf-py's name map, parents first, never overwriting), with the
    name map built once instead of once per module (seconds on a 30-layer model)."""
    gguf = require_gguf()
    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in names:
        raise Nf4tuneError(f"the gguf package does not know the architecture {arch!r}; upgrade it: pip install -U gguf")
    name_map = gguf.get_tensor_name_map(names[arch], model.config.num_hidden_layers)
    mapping: dict[str, str] = {}
    for prefix, module in model.named_modules():
        qual = f"{prefix}." if prefix else ""
        for hf_name in module.state_dict(keep_vars=True):
            hf_name = processor.preprocess_name(hf_name)
            name, suffix = hf_name, ""
            if hf_name.endswith((".weight", ".bias")):
                name, suffix = hf_name.rsplit(".", 1)
                suffix = "." + suffix
            gguf_name = name_map.get_name(name)
            if gguf_name is None:
                processor.perform_fallback_tensor_mapping(mapping, suffix, qual, hf_name)
            else:
                mapping.setdefault(gguf_name + suffix, qual + hf_name)
    return mapping


def _weights_map(path: Path):
    """(processor, {gguf tensor name: transformers key}) for the file's architecture."""
    return _weights_map_cached(_key(path))


def gguf_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's transformers key and (torch-order) shape, from the file's tensor table only."""
    _, mapping = _weights_map(path)
    return {mapping[t.name]: [int(d) for d in reversed(t.shape)] for t in reader(path).tensors if t.name in mapping}


def gguf_nbytes(path: Path) -> int:
    """Bytes of the dequantized (float32) tensors: what a progress bar over them counts."""
    return sum(int(t.n_elements) * 4 for t in reader(path).tensors)


def iter_gguf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (transformers key, float32 tensor), dequantized one tensor at a time, in file order."""
    import numpy as np

    gguf = require_gguf()
    config = gguf_config(path)
    processor, mapping = _weights_map(path)
    for t in reader(path).tensors:
        try:
            weights = gguf.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise Nf4tuneError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which the gguf package cannot "
                               "dequantize; convert the file to another type with llama.cpp's llama-quantize.") from e
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=mapping,
                                   parsed_parameters={"tensors": {}, "config": config})
        if result.name not in mapping:
            continue
        yield mapping[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))


@contextlib.contextmanager
def companion_files(ckpt) -> Iterator[Path]:
    """The folder whose tokenizer and other files a checkpoint written from `ckpt` copies: its own
    folder, or for a GGUF checkpoint a temporary one holding the tokenizer from the GGUF metadata
    (the folder of a .gguf may hold anything)."""
    if ckpt.gguf is None:
        yield ckpt.path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        gguf_tokenizer(ckpt.gguf).save_pretrained(tmp)
        yield Path(tmp)
