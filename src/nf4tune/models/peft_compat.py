"""What transformers' `Trainer` and TRL expect of a PEFT model, on an nf4tune QLoRA model.

`load_model` gives the transformers model a subclass of its own class, `Nf4tune<Class>`, adding:

- `forward(..., labels=...)` in training mode computes the loss with nf4tune's chunked loss from the
  final hidden states (no batch x seq x vocab logits; `logits` is None, as with Liger-Kernel's fused
  linear cross-entropy, unless `skip_logits=False` is passed), with transformers' label shift,
  `ignore_index` and `num_items_in_batch`. In eval mode or without labels it is the model's own forward.
- `save_pretrained(dir)` writes the adapter exactly as `nf4tune.save_adapter` (PEFT's format), and
  so do `Trainer.save_model`, Trainer checkpoints and `push_to_hub`; `load_state_dict` reads that
  adapter back, which is how `Trainer(resume_from_checkpoint=...)` restores it.
- `print_trainable_parameters()` / `get_nb_trainable_parameters()` as PEFT prints them.
- `peft.prepare_model_for_kbit_training` and `peft.get_peft_model` on it stop with one sentence:
  nf4tune already did both, and PEFT would freeze (or fail to wrap) the 4-bit adapters.
- `peft.PeftModel.from_pretrained(model, DIR, is_trainable=...)` loads the adapter into nf4tune's own
  LoRA layers, as `load_model(base, adapter=DIR)` does (models/peft_resume.py).

nf4tune's own state is one declared object, `model.nf4tune` (`Nf4tuneState`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from types import FrameType

import torch
from torch import nn

from ..errors import Nf4tuneError
from ..layers.kept_outputs import DEFAULT_BUDGET_GIB, KeepOutputsCheckpoint
from ..layers.lora import LoraConfig, lora_layers, trainable_parameters
from ..registry import families
from .adapters import _KEY, _TOKEN_KEY, PREFIX, WEIGHTS_NAME, expert_adapters, save_adapter
from .loss import LogitTransform, chunked_loss_sum, shifted_targets

# Trainer's resume reads `model.safetensors.index.json` when a checkpoint has no full weights and the
# model is not a peft.PeftModel; this index points it at the adapter file, which `load_state_dict` reads.
INDEX_NAME = "model.safetensors.index.json"
# Trainer's load_best_model_at_end, seeing an adapter file in a checkpoint of a model that is not a
# peft.PeftModel, reads `model.safetensors` (else pytorch_model.bin) and nothing else. In Trainer's checkpoint
# folders (named checkpoint-N) that name is a hard link to the adapter file (no second copy on disk).
SAFE_WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")
_CHUNKED = families("chunked_loss")  # the labels forward's chunked loss (models/loss.py) serves these

# Functions of PEFT that would freeze the adapters (prepare_model_for_kbit_training) or try to wrap the
# 4-bit layers (get_peft_model, PeftModel(...), PeftModel.from_pretrained go through inject_adapter, which
# lists the model's modules first: PeftModel.from_pretrained is let through there, models/peft_resume.py).
_PEFT_ENTRY_POINTS = {"prepare_model_for_kbit_training", "get_peft_model", "inject_adapter"}
_ALREADY_DONE = (
    "this model is already a QLoRA model from nf4tune.load_model (4-bit base, LoRA adapters trainable, "
    "gradient checkpointing on), so drop peft.prepare_model_for_kbit_training / get_peft_model (and a Trainer's "
    "peft_config) from your script; load a saved adapter with peft.PeftModel.from_pretrained(model, DIR) or "
    "nf4tune.load_model(base, adapter=DIR)."
)
_NO_ADAPTERS_YET = (
    "this is a 4-bit model from nf4tune.load_model, whose layers PEFT cannot wrap, so drop "
    "peft.prepare_model_for_kbit_training / get_peft_model (and a Trainer's peft_config) from your script and "
    "load it with nf4tune.load_model(base, lora=nf4tune.LoraConfig(...)) (4-bit base, LoRA adapters trainable, "
    "gradient checkpointing on); load a saved adapter with peft.PeftModel.from_pretrained(model, DIR)."
)


@dataclass
class Nf4tuneState:
    """What nf4tune keeps on a model it loaded.

    Args:
        base: the checkpoint the model was loaded from (written as the adapter's base model).
        lora_config: the adapters' configuration.
        new_tokens_from: the first row of tokens added to the vocabulary (they train and are saved
            with the adapter), or None.
        loss_chunk_tokens: tokens projected to the vocabulary at a time by the training loss.
        skip_logits: default of `forward(..., skip_logits=...)`: with labels in training mode, return
            no logits (the loss never builds them).
        kept_outputs_gib: under gradient checkpointing, the 4-bit layers' outputs of the first run are
            kept (up to this many GiB at a time) so that the recompute in backward skips their matmuls
            (`layers.kept_outputs`); 0 recomputes everything, as plain checkpointing does.
    """

    base: str | None = None
    lora_config: LoraConfig | None = None
    new_tokens_from: int | None = None
    loss_chunk_tokens: int = 1024
    skip_logits: bool = True
    kept_outputs_gib: float = DEFAULT_BUDGET_GIB


def _peft_caller(depth: int = 6) -> FrameType | None:
    """The frame of the PEFT entry point among the callers a few frames up, if any."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code.co_name in _PEFT_ENTRY_POINTS and frame.f_globals.get("__name__", "").startswith("peft"):
            return frame
        frame = frame.f_back
    return None


def _answer_peft(model, caller: FrameType) -> None:
    """Let PEFT go on where nf4tune takes the call over (PeftModel.from_pretrained), else stop with one sentence."""
    if caller.f_code.co_name == "inject_adapter":
        from .peft_resume import take_over_from_pretrained

        if take_over_from_pretrained(model, caller):
            return
    raise Nf4tuneError(_ALREADY_DONE if model.nf4tune.lora_config is not None else _NO_ADAPTERS_YET)


class Nf4tuneModelMixin:
    """Mixed into the transformers model class by `attach`; see the module docstring."""

    nf4tune: Nf4tuneState
    # Trainer passes num_items_in_batch (and leaves gradient accumulation to the loss) when this is True.
    accepts_loss_kwargs = True

    # The attributes the rest of nf4tune reads and writes, kept in the declared state.
    @property
    def nf4tune_lora_config(self) -> LoraConfig | None:
        return self.nf4tune.lora_config

    @nf4tune_lora_config.setter
    def nf4tune_lora_config(self, value: LoraConfig | None) -> None:
        self.nf4tune.lora_config = value

    @property
    def nf4tune_base(self) -> str | None:
        return self.nf4tune.base

    @nf4tune_base.setter
    def nf4tune_base(self, value: str | None) -> None:
        self.nf4tune.base = value

    @property
    def nf4tune_new_tokens_from(self) -> int | None:
        return self.nf4tune.new_tokens_from

    @nf4tune_new_tokens_from.setter
    def nf4tune_new_tokens_from(self, value: int | None) -> None:
        self.nf4tune.new_tokens_from = value

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        # Every way of turning checkpointing on ends here, under either of transformers' names (load_model,
        # Trainer's activation_checkpointing=True or gradient_checkpointing=True, a script's
        # activation_checkpointing_enable or gradient_checkpointing_enable): the layers get a checkpoint that
        # keeps the 4-bit outputs. A private hook of transformers: tests/test_private_hooks.py holds it to that.
        # The rest of transformers' arguments (every_n_layers on recent releases) pass through as they came.
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        if not isinstance(gradient_checkpointing_func, KeepOutputsCheckpoint):
            gradient_checkpointing_func = KeepOutputsCheckpoint(gradient_checkpointing_func,
                                                                functools.partial(getattr, self.nf4tune, "kept_outputs_gib"))
        return super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func,
                                                   **kwargs)

    def named_modules(self, *args, **kwargs):
        # The first thing PEFT's entry points do with a model that reaches nf4tune: list its modules.
        caller = _peft_caller()
        if caller is not None:
            _answer_peft(self, caller)
        return super().named_modules(*args, **kwargs)

    # --- saving and loading -------------------------------------------------------------------

    def save_pretrained(self, save_directory, *, tokenizer=None, is_main_process: bool = True, **kwargs) -> None:
        """Write the adapter as `nf4tune.save_adapter` does (PEFT's format), and the tokenizer when given.

        transformers' other arguments (`state_dict`, `safe_serialization`, `max_shard_size`, ...) are
        accepted and ignored: the adapter is small, and always safetensors.
        """
        if not is_main_process:
            return
        directory = save_adapter(self, save_directory)
        # Named as in this model's state dict: the tensors Trainer's resume restores from the adapter file.
        index = {"metadata": {"format": "nf4tune PEFT adapter; this index lets Trainer's resume_from_checkpoint find it"},
                 "weight_map": {k: WEIGHTS_NAME for k in self._saved_keys()}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if _CHECKPOINT_FOLDER.fullmatch(directory.name):
            _link(directory / WEIGHTS_NAME, directory / SAFE_WEIGHTS_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def _saved_keys(self) -> list[str]:
        """State-dict names of what `save_pretrained` writes: the adapters (and trained new-token rows)."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        # transformers' name for what a save leaves out: the frozen base model. Trainer's resume reads it
        # to tell an adapter checkpoint's expected gaps from missing weights.
        saved = set(self._saved_keys())
        return [k for k in self.state_dict() if k not in saved]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A full state dict loads as usual; an adapter's (PEFT key names) loads into the adapters."""
        if not any(_KEY.match(k) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        layers = lora_layers(self)
        layers |= {peft_name: weight for peft_name, (_, weight) in expert_adapters(self).items()}  # MoE experts
        vocab = {name: m for name, m in self.named_modules() if isinstance(m, (nn.Embedding, nn.Linear))
                 and not hasattr(m, "weight_packed")}
        loaded, unexpected = set(), []
        with torch.no_grad():
            for key, tensor in state_dict.items():
                m = _KEY.match(key)
                module = key.removeprefix(PREFIX).removesuffix(".weight")
                if m is not None and m["module"] in layers:
                    getattr(layers[m["module"]], f"lora_{m['which']}").copy_(tensor)
                    loaded.add(f"{m['module']}.lora_{m['which']}")
                elif m is None and module in vocab and vocab[module].weight.shape == tensor.shape:
                    vocab[module].weight.copy_(tensor)  # trained new-token rows (modules_to_save)
                    loaded.add(f"{module}.weight")
                elif (t := _TOKEN_KEY.match(key)) and t["module"] in vocab and self.nf4tune.new_tokens_from is not None \
                        and vocab[t["module"]].weight[self.nf4tune.new_tokens_from:].shape == tensor.shape:
                    vocab[t["module"]].weight[self.nf4tune.new_tokens_from:].copy_(tensor)  # the added tokens' rows
                    loaded.add(f"{t['module']}.weight")
                else:
                    unexpected.append(key)
        missing = [f"{name}.lora_{w}" for name in layers for w in "AB" if f"{name}.lora_{w}" not in loaded]
        if strict and (missing or unexpected):
            raise Nf4tuneError(f"the adapter does not fit this model: {len(missing)} adapter tensor(s) missing "
                               f"(first: {(missing or ['-'])[0]}), {len(unexpected)} unexpected "
                               f"(first: {(unexpected or ['-'])[0]}).")
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    # --- what PEFT users call -----------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, 4-bit weights counted by their number of elements (as PEFT)."""
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print the counts as PEFT does: `trainable params: ... || all params: ... || trainable%: ...`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def _link(source, target) -> None:
    """`target` as a hard link to `source` (a copy where the file system has no hard links)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _chunked_forward(model, arguments: dict):
    """The training forward with labels: backbone, then the chunked loss on the labelled positions."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = arguments.pop("labels")
    num_items = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    ignore_index = arguments.pop("ignore_index", -100)
    arguments.pop("logits_to_keep", None)
    arguments["use_cache"] = False  # training keeps no KV cache
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(**arguments)
    hidden, targets = shifted_targets(out.last_hidden_state, labels, shift_labels, ignore_index)
    total = chunked_loss_sum(hidden, model.get_output_embeddings(), targets, model.nf4tune.loss_chunk_tokens,
                             LogitTransform.of(model.config))
    if num_items is None:
        loss = total / targets.numel()  # transformers' mean over labelled tokens (NaN when there are none, as there)
    else:
        loss = total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))


def _refuse_other_autocast(model) -> None:
    """Autocast to a dtype other than the model's compute dtype (e.g. TrainingArguments(bf16=True) on a
    float32 model) would mix dtypes inside the 4-bit layers: one sentence instead."""
    weight = model.get_input_embeddings().weight
    device = weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != weight.dtype:
        wanted = str(torch.get_autocast_dtype(device)).removeprefix("torch.")
        raise Nf4tuneError(f"this model computes in {str(weight.dtype).removeprefix('torch.')} but {wanted} autocast is "
                           f"on (e.g. TrainingArguments(bf16=True)); load it with compute_dtype=torch.{wanted} "
                           "(bfloat16 is nf4tune's default) or turn the autocast off.")


def _make_forward(base_forward):
    """A forward with the base class's signature (Trainer keeps the dataset columns it names)."""
    signature = inspect.signature(base_forward)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(base_forward)
    def forward(self, *args, skip_logits: bool | None = None, **kwargs):
        _refuse_other_autocast(self)
        skip = self.nf4tune.skip_logits if skip_logits is None else skip_logits
        labels = kwargs.get("labels")
        if labels is None and args:
            bound = signature.bind_partial(self, *args, **kwargs).arguments
            labels = bound.get("labels")
        if labels is None or not self.training or not skip or self.config.model_type not in _CHUNKED \
                or var_keyword is None:
            return base_forward(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        bound.pop(next(iter(signature.parameters)))  # self
        arguments = {**{k: v for k, v in bound.items() if k != var_keyword}, **bound.get(var_keyword, {})}
        return _chunked_forward(self, arguments)

    forward.__signature__ = signature  # documented parameters; skip_logits is accepted through **kwargs
    return forward


@functools.lru_cache(maxsize=None)
def _compat_class(cls: type) -> type:
    name = f"Nf4tune{cls.__name__}"
    compat = type(name, (Nf4tuneModelMixin, cls), {"forward": _make_forward(cls.forward), "__module__": __name__})
    setattr(sys.modules[__name__], name, compat)  # so pickle finds it
    return compat


def attach(model, state: Nf4tuneState) -> None:
    """Give `model` the Trainer / PEFT-facing behaviour of this module, with `state` as `model.nf4tune`."""
    if not isinstance(model, Nf4tuneModelMixin):
        model.__class__ = _compat_class(type(model))
    model.nf4tune = state


def is_nf4tune_model(model) -> bool:
    return isinstance(model, Nf4tuneModelMixin)


__all__ = ["INDEX_NAME", "Nf4tuneModelMixin", "Nf4tuneState", "attach", "is_nf4tune_model"]
