"""Per-layer gradient checkpointing of a transformers model, on and off, under the names the installed
transformers has. This module is the one place that tells those names apart.

transformers 5.25 renamed `gradient_checkpointing_enable` / `gradient_checkpointing_disable` /
`is_gradient_checkpointing` (and `TrainingArguments(gradient_checkpointing=...)`) to
`activation_checkpointing*`; the old names still work but warn (FutureWarning) and go in v6. nf4tune
calls the new names where transformers has them and the old ones on the releases before the rename, so
its own calls never warn.

Whichever name a script calls (and Trainer with either training argument), transformers ends in the
model's `_set_gradient_checkpointing`, which nf4tune's QLoRA models override
(`Nf4tuneModelMixin._set_gradient_checkpointing`) to give the layers a checkpoint that keeps the 4-bit
outputs (`layers.kept_outputs.KeepOutputsCheckpoint`).
"""

from __future__ import annotations

import functools

# What nf4tune checkpoints with: non-reentrant, which needs no input that requires grad (the reentrant
# one does) and is the one torch recommends.
CHECKPOINT_KWARGS = {"use_reentrant": False}


@functools.cache
def renamed() -> bool:
    """Whether the installed transformers has the `activation_checkpointing*` names (5.25 on)."""
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "activation_checkpointing_enable")


def enable_checkpointing(model, checkpoint_kwargs: dict | None = None) -> None:
    """Recompute each of `model`'s decoder layers in backward; `checkpoint_kwargs` go to
    `torch.utils.checkpoint.checkpoint` (default: non-reentrant)."""
    kwargs = dict(CHECKPOINT_KWARGS if checkpoint_kwargs is None else checkpoint_kwargs)
    if renamed():
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model) -> None:
    """Keep every layer's activations again (no recompute in backward)."""
    if renamed():
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    """Whether any of `model`'s layers is recomputed in backward."""
    return bool(model.is_activation_checkpointing if renamed() else model.is_gradient_checkpointing)


def training_arguments(on: bool = True, checkpoint_kwargs: dict | None = None) -> dict:
    """The `TrainingArguments` keywords that turn Trainer's checkpointing on (or off), under the
    installed transformers' names, e.g. `TrainingArguments(output_dir, **training_arguments())`."""
    name = "activation_checkpointing" if renamed() else "gradient_checkpointing"
    kwargs = dict(CHECKPOINT_KWARGS if checkpoint_kwargs is None else checkpoint_kwargs)
    return {name: on, f"{name}_kwargs": kwargs} if on else {name: False}


__all__ = ["disable_checkpointing", "enable_checkpointing", "is_checkpointing", "renamed", "training_arguments"]
