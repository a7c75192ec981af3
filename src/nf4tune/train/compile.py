"""The training step's decoder layers: compiled with `torch.compile` (`training.compile`), checkpointed
per layer, their saved inputs optionally offloaded to host memory (`training.offload_activations`).

Each decoder layer's own forward is compiled (Inductor fuses its norms, rotary, SwiGLU, residual adds
and casts; the 4-bit linear + LoRA is the `nf4tune::lora_linear_4bit` custom op, so the graph does not
break there), and the checkpoint stays outside the compiled region, which is how the offload hooks see
the layer's input. The compiled forward runs only where gradients are recorded: evaluation and
generation keep the eager layers (no compile for shapes used once, no cache updates in a graph).

Transformers' own per-layer checkpointing (`GradientCheckpointingLayer`, which wraps the class's
`forward`) is replaced for these layers by an instance `forward` that does the same, so parameter
names, state dicts and saved adapters are unchanged. (transformers before 5.23 checkpoints in the layer's
`__call__` instead, around this instance forward: torch's non-reentrant checkpoints nest, and the layer is
still recomputed once.)
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import dispatch
from ..errors import Nf4tuneError
from .offload import ActivationOffloader, transfers_for

log = logging.getLogger("nf4tune")

COMPILE_CHOICES = ("auto", True, False)  # auto: as `dispatch.path("train_compile", ...)` says (on CUDA)
# Inductor generates the fused kernels. The CPU tests use "aot_eager": the same capture of forward and
# backward (custom op, no graph breaks, the partitioned backward), without a minute of C++ code generation.
BACKEND = "inductor"


def compile_wanted(setting, device: torch.device) -> bool:
    """Whether `training.compile` = `setting` compiles the layers on `device` (auto: dispatch's choice)."""
    if setting == "auto":
        return dispatch.path("train_compile", device).fast
    return bool(setting)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder (and encoder) layers: transformers' checkpointable layers, outermost only."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(p + ".") for p in inside):
            found.append(module)
            inside.add(name)
    return found


# The function `GradientCheckpointingLayer.__init_subclass__` wraps each layer class's `forward` in (transformers
# 5.23 on; before, the layer's `__call__` checkpoints, around the instance forward set here). Told by its code's
# name, which `functools.wraps` leaves as it is while it gives the wrapper the forward's `__name__`. A wrapper
# left in place checkpoints the layer a second time, inside the compiled graph, where a side effect of the
# layer's own decorators breaks the graph (the hub-kernel routing of `kernels`, which transformers 5.25 installs).
CHECKPOINTING_WRAPPER = "forward_with_checkpointing"


def is_checkpointing_wrapper(function) -> bool:
    """Whether `function` is transformers' per-layer checkpointing wrapper around a layer's forward."""
    return getattr(getattr(function, "__code__", None), "co_name", None) == CHECKPOINTING_WRAPPER


def _unwrapped(wrapper):
    """The forward a checkpointing wrapper calls: its `__wrapped__`, else the `forward` it closes over."""
    if hasattr(wrapper, "__wrapped__"):
        return wrapper.__wrapped__
    cells = dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__ or ()))
    if "forward" not in cells:
        raise Nf4tuneError("transformers' per-layer checkpointing wrapper no longer says which forward it wraps; "
                           "set training.compile: false and training.offload_activations: false with this version.")
    return cells["forward"].cell_contents


def own_forward(layer: nn.Module):
    """The layer's forward without transformers' checkpointing wrapper(s), bound to it (the layer's own
    decorators, e.g. deprecated-argument renames, stay)."""
    forward = type(layer).forward
    while is_checkpointing_wrapper(forward):
        forward = _unwrapped(forward)
    return forward.__get__(layer)


class LayerStep:
    """A decoder layer's forward: `compiled` while gradients are recorded, else `eager`; checkpointed
    in training when `checkpointing`, inside the offloader's hooks when there is one."""

    def __init__(self, layer: nn.Module, eager, compiled=None, checkpointing: bool = True,
                 offloader: ActivationOffloader | None = None):
        self.layer, self.eager, self.compiled = layer, eager, compiled
        self.checkpointing, self.offloader = checkpointing, offloader

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        run = self.compiled or self.eager
        if not (self.checkpointing and self.layer.training):
            return run(*args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False  # a recomputed layer would write the cache twice
        fn = functools.partial(run, **kwargs)
        if self.offloader is None:
            return checkpoint(fn, *args, use_reentrant=False)
        with self.offloader.hooks():
            return checkpoint(fn, *args, use_reentrant=False)


def prepare_layers(model: nn.Module, compile_setting, offload_activations: bool, checkpointing: bool,
                   device: torch.device) -> ActivationOffloader | None:
    """Install `LayerStep`s on the model's decoder layers as the recipe asks; returns the offloader
    (None without offload). Does nothing when neither compiling nor offloading."""
    compiling = compile_wanted(compile_setting, device)
    if not (compiling or offload_activations):
        return None
    if offload_activations and not checkpointing:
        raise Nf4tuneError("training.offload_activations moves the inputs that per-layer checkpointing keeps; "
                           "set model.gradient_checkpointing: true with it.")
    layers = decoder_layers(model)
    if not layers:
        raise Nf4tuneError(f"{type(model).__name__} has no transformers decoder layers to "
                           f"{'compile' if compiling else 'checkpoint'}; set training.compile: false"
                           f"{' and training.offload_activations: false' if offload_activations else ''}.")
    offloader = ActivationOffloader(transfers_for(device)) if offload_activations else None
    for layer in layers:
        eager = own_forward(layer)
        compiled = torch.compile(eager, backend=BACKEND) if compiling else None
        layer.forward = LayerStep(layer, eager, compiled, checkpointing, offloader)
    log.info("nf4tune: %d decoder layers%s%s", len(layers), ", compiled" if compiling else "",
             ", inputs offloaded to host memory" if offload_activations else "")
    return offloader
