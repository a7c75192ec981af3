"""Training on top of the QLoRA model: recipes, data, the loop, checkpoints. The CLI calls `train`.

The names load on first use, so importing a light submodule (recipes, formats) does not import torch.
"""

__all__ = ["Recipe", "TrainResult", "load_recipe", "train"]
_LAZY = {"Recipe": ".config", "load_recipe": ".config", "TrainResult": ".loop", "train": ".loop"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nf4tune.train' has no attribute {name!r}")
