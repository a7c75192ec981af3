"""`peft.PeftModel.from_pretrained(model, DIR, is_trainable=True)` on a model from `nf4tune.load_model`.

The way many QLoRA scripts resume: the adapter loads into nf4tune's own 4-bit LoRA layers, through
`adapters.load_adapter`, the code `load_model(base, adapter=DIR)` runs, so both give the same model.

PEFT has no extension point for a model whose layers already are LoRA layers, and `from_pretrained`
always returns a PeftModel it builds. So nf4tune answers where PEFT first reaches the model, its
injection listing the model's modules (`Nf4tuneModelMixin.named_modules`, the one interception point):
if PEFT's `from_pretrained` was called with this model, the two objects it is building for it, and
only those, get an nf4tune subclass of their own class:

- the tuner (PEFT's `LoraModel`, `peft_model.base_model`) claims the targeted layers without wrapping
  them and leaves what trains to nf4tune;
- the PeftModel loads adapters (`load_adapter`: `from_pretrained` calls it next, Trainer's resume and
  `load_best_model_at_end` call it again) and saves them (`save_pretrained`) the way nf4tune does,
  counts parameters as nf4tune does, and `disable_adapter()` turns nf4tune's adapters off.

The rest is PEFT's: a `peft.PeftModel` whose forward is the nf4tune model's (fused 4-bit layers, chunked
loss), so Trainer and TRL treat it as any PeftModel. What this takes from PEFT beyond its public API
is tested by name in tests/test_peft_resume.py (test_the_peft_internals_nf4tune_relies_on).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from types import FrameType
from typing import Callable

from torch.nn.modules.module import _IncompatibleKeys

from ..errors import Nf4tuneError
from ..layers.lora import lora_layers
from .adapters import _KEY, load_adapter
from .checkpointing import enable_checkpointing, is_checkpointing

_ONE_ADAPTER = ("an nf4tune model holds one adapter (here {active!r}), so PEFT's {what} is not available on it; "
                "to switch between several adapters on one 4-bit base use nf4tune.models.adapters.AdapterBank.")
_NO_MERGE = ("nf4tune keeps the adapter unmerged on the 4-bit base; to write the base with the adapter merged in, "
             "save it (model.save_pretrained(DIR)) and run nf4tune.models.merge.merge_adapter(base, DIR, OUT) "
             "or `nf4tune merge`.")


def take_over_from_pretrained(model, inject_frame: FrameType) -> bool:
    """Called when PEFT's `inject_adapter` (running in `inject_frame`) lists the modules of the nf4tune
    `model`. True if this is `PeftModel.from_pretrained(model, ...)`, whose tuner and PeftModel are then
    nf4tune's (see the module docstring); False for the other ways in (get_peft_model, PeftModel(...))."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    tuner = inject_frame.f_locals.get("self")
    if isinstance(tuner, Nf4tuneTuner):
        return True  # the rest of the same injection, listing the modules again
    called = _enclosing(inject_frame, lambda f: f.f_code.co_name == "from_pretrained"
                        and f.f_locals.get("model") is model and _is_subclass(f.f_locals.get("cls"), PeftModel))
    building = _enclosing(inject_frame, lambda f: isinstance(f.f_locals.get("self"), PeftModel))
    if called is None or building is None:
        return False
    config = tuner.peft_config[inject_frame.f_locals["adapter_name"]]
    if not isinstance(tuner, LoraModel):
        raise Nf4tuneError(f"this is a {config.peft_type.value} adapter; nf4tune loads LoRA adapters.")
    if config.trainable_token_indices or config.modules_to_save:
        # PEFT would wrap the embedding / head for them before nf4tune sees the adapter's files.
        raise Nf4tuneError("this adapter trains vocabulary rows (new tokens, modules_to_save), which PEFT would put "
                           "on the embedding itself; load it with nf4tune.load_model(base, adapter=DIR), which grows "
                           "the vocabulary and loads the adapter's tokenizer.")
    tuner.__class__ = _nf4tune_class(type(tuner), Nf4tuneTuner)
    peft_model = building.f_locals["self"]
    peft_model.__class__ = _nf4tune_class(type(peft_model), Nf4tunePeftModel)
    return True


def _enclosing(frame: FrameType, wanted: Callable[[FrameType], bool], depth: int = 12) -> FrameType | None:
    """The nearest of `frame`'s callers (a few frames up) for which `wanted` holds."""
    frame = frame.f_back
    for _ in range(depth):
        if frame is None:
            return None
        if wanted(frame):
            return frame
        frame = frame.f_back
    return None


def _is_subclass(cls, base: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, base)


@functools.lru_cache(maxsize=None)
def _nf4tune_class(cls: type, mixin: type) -> type:
    """`cls` with `mixin`'s methods first, named after both (shown in reprs and tracebacks)."""
    name = f"{mixin.__name__}{cls.__name__}"
    made = type(name, (mixin, cls), {"__module__": __name__})
    globals()[name] = made  # so pickle finds it
    return made


def load_into(model, directory: str | Path, trainable: bool) -> None:
    """Load the adapter in `directory` into the nf4tune `model` as `load_model(base, adapter=DIR)` does,
    trainable or frozen; a model loaded without adapters gets gradient checkpointing, as there."""
    load_adapter(model, directory)  # trainable adapters, everything else frozen
    if not trainable:
        for layer in lora_layers(model).values():
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
    if trainable and not is_checkpointing(model):
        enable_checkpointing(model)


def _adapter_folder(model_id, subfolder: str | None) -> Path:
    """The local folder of an adapter named as PEFT names it (a folder, or a Hub id, and a subfolder)."""
    from ..checkpoint.hf import resolve

    folder = Path(model_id)
    if not folder.is_dir():
        folder = resolve(model_id)
    return folder / subfolder if subfolder else folder


class Nf4tuneTuner:
    """Mixed before PEFT's LoraModel: nf4tune's 4-bit layers already are LoRA layers."""

    def _create_and_replace(self, *args, **kwargs) -> None:
        # The layer stays nf4tune's; the adapter's tensors and shape arrive with PeftModel.load_adapter.
        pass

    def _mark_only_adapters_as_trainable(self, model) -> None:
        # nf4tune's load_adapter says what trains (is_trainable).
        pass

    def merge_and_unload(self, *args, **kwargs):
        raise Nf4tuneError(_NO_MERGE)

    def merge_adapter(self, *args, **kwargs):
        raise Nf4tuneError(_NO_MERGE)

    def unload(self, *args, **kwargs):
        raise Nf4tuneError(_NO_MERGE)


class Nf4tunePeftModel:
    """Mixed before PEFT's PeftModel class: loading, saving and counting go through the nf4tune model."""

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     **kwargs) -> _IncompatibleKeys:
        """Load the adapter at `model_id` (a folder, or a Hub id with `subfolder=`) into the nf4tune model;
        `is_trainable=False` freezes it. It replaces the one adapter the model holds."""
        if adapter_name not in self.peft_config:
            raise Nf4tuneError(_ONE_ADAPTER.format(active=self.active_adapter, what=f"load_adapter(..., {adapter_name!r})"))
        load_into(self.get_base_model(), _adapter_folder(model_id, kwargs.get("subfolder")), trainable=is_trainable)
        self.peft_config[adapter_name].inference_mode = not is_trainable
        return _IncompatibleKeys([], [])

    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        save_embedding_layers="auto", is_main_process: bool = True, **kwargs) -> None:
        """Write the adapter as `nf4tune.save_adapter` does (PEFT's format), in `save_directory`, or in its
        subfolder named after the adapter when that is not "default" (as PEFT). Other arguments are accepted
        and ignored: the adapter is small, and always safetensors."""
        for name in selected_adapters or list(self.peft_config):
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            self.get_base_model().save_pretrained(folder, is_main_process=is_main_process)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Trainer's resume reads a checkpoint's model.safetensors (nf4tune's link to the adapter file) this way.
        if any(_KEY.match(k) for k in state_dict):
            return self.get_base_model().load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, 4-bit weights counted by their number of elements (as PEFT)."""
        return self.get_base_model().get_nb_trainable_parameters()

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base model alone inside the `with` block (the adapters scaled by 0), as PEFT's."""
        layers = list(lora_layers(self.get_base_model()).values())
        scalings = [layer.scaling for layer in layers]
        try:
            for layer in layers:
                layer.scaling = 0.0
            yield
        finally:
            for layer, scaling in zip(layers, scalings):
                layer.scaling = scaling

    def add_adapter(self, adapter_name: str, *args, **kwargs):
        raise Nf4tuneError(_ONE_ADAPTER.format(active=self.active_adapter, what="add_adapter"))

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """The one adapter stays active; `inference_mode=True` freezes it (as PEFT)."""
        if adapter_name not in (self.active_adapter, [self.active_adapter]):
            raise Nf4tuneError(_ONE_ADAPTER.format(active=self.active_adapter, what=f"set_adapter({adapter_name!r})"))
        if inference_mode:
            self.set_requires_grad(adapter_name, requires_grad=False)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Make the adapter trainable or frozen (as PEFT)."""
        for layer in lora_layers(self.get_base_model()).values():
            layer.lora_A.requires_grad_(requires_grad)
            layer.lora_B.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str):
        raise Nf4tuneError(_ONE_ADAPTER.format(active=self.active_adapter, what="delete_adapter"))


__all__ = ["Nf4tunePeftModel", "Nf4tuneTuner", "load_into", "take_over_from_pretrained"]
