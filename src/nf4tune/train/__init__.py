"""Training on top of the QLoRA model: recipes, data, the loop, checkpoints. The CLI calls `train`.

The names load on first use, so importing a light submodule (recipes, formats) does not import torch.
"""

from ..lazy import lazy_names

__all__ = ["Recipe", "TrainResult", "load_recipe", "train"]
_LAZY = {"Recipe": ".config", "load_recipe": ".config", "TrainResult": ".loop", "train": ".loop"}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
