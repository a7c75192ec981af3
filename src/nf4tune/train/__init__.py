"""Training on top of the QLoRA model: recipes, data, the loop, checkpoints. The CLI calls `train`."""

from .config import Recipe, load_recipe
from .loop import TrainResult, train

__all__ = ["Recipe", "TrainResult", "load_recipe", "train"]
