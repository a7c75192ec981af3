"""Writing a Hugging Face checkpoint folder atomically, one shard at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import give_file_mode, move_into_place, temp_dir
from ..errors import Nf4tuneError
from ..outputs import OutOfSpace, is_out_of_space
from .hf import WEIGHTS_INDEX

# Files that describe the weights themselves; everything else (tokenizer, generation config,
# chat template, README) is copied from the source folder as it is.
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "*.gguf")


def shard_names(count: int) -> list[str]:
    """transformers' names for `count` safetensors shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class CheckpointWriter:
    """Writes shards into a temporary folder beside `out_dir` and renames it into place on success;
    on any error the temporary folder is removed, so `out_dir` is either complete or as it was. An
    existing `out_dir` with anything in it is refused unless `overwrite` (it is then replaced only by
    the complete new folder). A full disk is said as such (`OutOfSpace`), `expected_bytes` (about
    what the whole output takes) saying how much to free.

        with CheckpointWriter(out_dir, source_dir, shard_count) as writer:
            writer.write_shard(tensors)
            ...
            writer.finish(config)
    """

    def __init__(self, out_dir: str | Path, source_dir: Path, shard_count: int, overwrite: bool = False,
                 expected_bytes: int = 0):
        self.out_dir = Path(out_dir)
        if not overwrite and self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise Nf4tuneError(f"{self.out_dir} already exists and is not empty; choose a new output folder "
                               "(or pass --overwrite to replace it).")
        self.expected_bytes = expected_bytes
        self.source_dir = source_dir
        self.names = shard_names(shard_count)
        self.weight_map: dict[str, str] = {}
        self.nbytes = 0
        self.tmp: Path | None = None

    def __enter__(self) -> "CheckpointWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_dir(self.out_dir.parent, prefix=f".{self.out_dir.name}.")
        return self

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        name = self.names[len(set(self.weight_map.values()))]
        save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        give_file_mode(self.tmp / name)
        self.nbytes += sum(t.nbytes for t in tensors.values())
        self.weight_map.update(dict.fromkeys(tensors, name))

    def finish(self, config: dict) -> None:
        """Write config.json and the shard index, copy the source's other files, and move into place."""
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.nbytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for f in self.source_dir.iterdir():
            if f.is_file() and f.name != "config.json" and not any(f.match(p) for p in _WEIGHT_FILES):
                shutil.copyfile(f, self.tmp / f.name)  # a new file's permissions, not the source's
        move_into_place(self.tmp, self.out_dir)
        self.tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        full = isinstance(exc, Exception) and is_out_of_space(exc, self.out_dir.parent)  # before the space is freed
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if full and not isinstance(exc, OutOfSpace):
            raise OutOfSpace(self.out_dir, max(self.expected_bytes, self.nbytes), self.out_dir.parent,
                             after=f"{self.out_dir} is unchanged.") from None
