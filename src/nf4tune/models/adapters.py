"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, as PEFT writes them, so
`peft.PeftModel.from_pretrained(base, dir)` reads what `save_adapter` writes, and `load_adapter`
reads what PEFT writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import dispatch
from ..atomic import atomic_write
from ..errors import Nf4tuneError
from ..layers.linear4bit import Linear4bit, lora_scaling
from ..layers.lora import LoraConfig, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _atomic_write(path: Path, write) -> None:
    atomic_write(path, write)  # the permissions a plain open() gives, not mkstemp's 0600


def _vocab_module_names(model) -> dict[str, torch.nn.Module]:
    """The input embedding and output head modules by name (one if tied)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    found = {}
    for name, module in model.named_modules():
        if any(module is w for w in wanted if w is not None) and all(module.weight is not m.weight for m in found.values()):
            found[name] = module
    return found


def adapter_config(model, layers: list[str]) -> dict:
    """PEFT's adapter_config.json for the adapters of `model` on `layers`."""
    cfg: LoraConfig = getattr(model, "nf4tune_lora_config", None) or LoraConfig()
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "nf4tune_base", None) or getattr(model.config, "_name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(layers),
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(n.rsplit(".", 1)[-1] for n in _vocab_module_names(model))
        if getattr(model, "nf4tune_new_tokens_from", None) is not None else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model, directory: str | Path) -> Path:
    """Write the model's LoRA adapters to `directory` in PEFT's format (each file replaced atomically)."""
    layers = lora_layers(model)
    if not layers:
        raise Nf4tuneError("this model has no LoRA adapters to save; load it with lora=LoraConfig(...) or adapter=DIR.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    if getattr(model, "nf4tune_new_tokens_from", None) is not None:  # trained new-token rows travel whole
        for name, module in _vocab_module_names(model).items():
            tensors[f"{PREFIX}{name}.weight"] = module.weight.detach().contiguous().cpu()
    config = adapter_config(model, list(layers))
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(adapter_config, {module name: {"A": tensor, "B": tensor}}, {module name: full weight}) of a PEFT
    LoRA adapter folder; full weights are the `modules_to_save` (embeddings and head with new tokens)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise Nf4tuneError(f"{directory} has no {CONFIG_NAME}; is it a LoRA adapter folder?")
    if not (directory / WEIGHTS_NAME).is_file():
        extra = " (it has adapter_model.bin: re-save it with safetensors)" if (directory / "adapter_model.bin").is_file() else ""
        raise Nf4tuneError(f"{directory} has no {WEIGHTS_NAME}{extra}.")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        tensors = load_file(directory / WEIGHTS_NAME)
    except Exception as e:
        raise Nf4tuneError(f"the adapter in {directory} cannot be read ({str(e).splitlines()[0]}).") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise Nf4tuneError(f"{directory} is a {config.get('peft_type')} adapter; nf4tune loads LoRA adapters.")
    if config.get("use_dora"):
        raise Nf4tuneError(f"{directory} is a DoRA adapter; nf4tune loads plain LoRA adapters.")
    if config.get("alpha_pattern"):
        raise Nf4tuneError(f"{directory} sets a per-module alpha_pattern, which nf4tune does not support yet.")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise Nf4tuneError(f"{directory}: adapter rank r={config.get('r')!r}; a LoRA rank must be a positive integer.")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    to_save = set(config.get("modules_to_save") or [])
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is not None:
            pairs.setdefault(m["module"], {})[m["which"]] = t
            continue
        module = key.removeprefix(PREFIX).removesuffix(".weight")
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in to_save:
            saved[module] = t
            continue
        raise Nf4tuneError(f"{directory}: tensor {key} is not a LoRA A/B weight nor a module_to_save; "
                           "adapters with biases are not supported yet.")
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise Nf4tuneError(f"{directory}: {name} has lora_{next(iter(pair))} but not its partner.")
    return config, pairs, saved


def _check_fits(model, pairs: dict, config: dict, directory) -> None:
    modules = dict(model.named_modules())
    for name, pair in pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, Linear4bit):
            raise Nf4tuneError(
                f"the adapter in {directory} targets {name}, which is not a 4-bit linear layer of this model; "
                f"it was trained on another base model (its base: {config.get('base_model_name_or_path')})."
            )
        a, b = pair["A"], pair["B"]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            raise Nf4tuneError(
                f"the adapter in {directory} does not fit this model: {name} is {layer.in_features}->"
                f"{layer.out_features} but the adapter has A {list(a.shape)}, B {list(b.shape)}; "
                f"it was trained on another base model (its base: {config.get('base_model_name_or_path')})."
            )


def _lora_config(config: dict, pairs: dict) -> LoraConfig:
    return LoraConfig(r=config["r"], alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                      target_modules=sorted(pairs), use_rslora=bool(config.get("use_rslora", False)))


def load_adapter(model, directory: str | Path) -> list[str]:
    """Attach the LoRA adapters saved in `directory` (by nf4tune or PEFT) to `model`, checking they fit."""
    config, pairs, saved = read_adapter(directory)
    if saved:
        _load_saved_modules(model, saved, directory)
    _check_fits(model, pairs, config, directory)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    lora = _lora_config(config, pairs)
    for name, pair in pairs.items():
        layer = modules[name]
        layer.add_lora(pair["A"].shape[0], lora.alpha, lora.dropout, lora.use_rslora)  # rank from the tensors
        with torch.no_grad():
            layer.lora_A.copy_(pair["A"])
            layer.lora_B.copy_(pair["B"])
    model.nf4tune_lora_config = lora
    return sorted(pairs)


class AdapterBank:
    """Several LoRA adapters held for one 4-bit base, switched in by reference (no copies, no merging).

        bank = AdapterBank(model, {"chat": "adapters/chat", "sql": "adapters/sql"})
        bank.activate("sql")   # or None for the base model alone
        rows = bank.rows(["sql", None, "chat"])   # a batch whose rows each have their own (see RowAdapters)
    """

    def __init__(self, model, adapters: dict[str, str | Path]):
        self.model = model
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.active: str | None = None
        for name, directory in adapters.items():
            config, pairs, saved = read_adapter(directory)
            if saved:
                raise Nf4tuneError(f"the adapter {name!r} in {directory} adds tokens, which the server cannot hold beside "
                                   f"the base vocabulary yet; `nf4tune chat` and `nf4tune generate` take it with "
                                   f"--adapter {directory}.")
            _check_fits(model, pairs, config, directory)
            lora = _lora_config(config, pairs)
            device, dtype = next(iter(self.layers.values())).weight_packed.device, torch.float32
            self.adapters[name] = {
                module: (pair["A"].to(device, dtype), pair["B"].to(device, dtype),
                         lora_scaling(lora.alpha, pair["A"].shape[0], lora.use_rslora))
                for module, pair in pairs.items()
            }
        # per layer, per adapter: what the layer holds while it applies that adapter (None: nothing)
        self._held: dict[int, dict[str | None, tuple | None]] = {}
        for module, layer in self.layers.items():
            held = self._held[id(layer)] = {None: None}
            for name, chosen in self.adapters.items():
                if module in chosen:
                    a, b, scaling = chosen[module]
                    held[name] = (nn.Parameter(a, False), nn.Parameter(b, False), scaling)
                else:
                    held[name] = None
        self.activate(None)

    def _apply(self, layer: Linear4bit, name: str | None) -> None:
        held = self._held[id(layer)][name]
        if held is None:
            layer.lora_A = layer.lora_B = None
        else:
            layer.lora_A, layer.lora_B, layer.scaling = held

    def activate(self, name: str | None) -> None:
        """Make adapter `name` (None: none) the one every 4-bit layer applies."""
        self._check(name)
        for layer in self.layers.values():
            self._apply(layer, name)
        self.active = name

    def _check(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise Nf4tuneError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}.")

    def rows(self, names: list[str | None]) -> "RowAdapters":
        """Per-row adapters for one batch (None: the base alone); see `RowAdapters`."""
        for name in names:
            self._check(name)
        self.active = RowAdapters.MIXED  # the layers now hold whichever adapter a row used last
        return RowAdapters(self, names)


class RowAdapters:
    """Each row of a batch with its own adapter, applied unmerged, computed as `Linear4bit.infer`
    computes one adapter: with the CPU kernel, the 4-bit product is taken once for every row in
    float32, then each adapter's rows add their LoRA product before the one rounding; otherwise each
    adapter's rows go through `infer` apart, that adapter switched in by reference. The kernels sum a
    row alike whatever rows are beside it, so a row's result is bit for bit what it gets alone
    (tests/test_serve_clients.py checks it)."""

    MIXED = "<per-row adapters>"

    def __init__(self, bank: AdapterBank, names: list[str | None]):
        self.bank, self.names = bank, list(names)
        self._all = self._groups(range(len(self.names)))

    def assign(self, row: int, name: str | None) -> None:
        """Put adapter `name` on row `row` (the batch grows to hold it): continuous batching."""
        self.bank._check(name)
        self.names.extend([None] * (row + 1 - len(self.names)))
        self.names[row] = name
        self._all = self._groups(range(len(self.names)))

    def trim(self, rows: int) -> None:
        """Keep the first `rows` rows only (the batch shrank)."""
        del self.names[rows:]
        self._all = self._groups(range(len(self.names)))

    def _groups(self, rows) -> dict[str | None, list[int]]:
        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self.names[row], []).append(i)
        return groups

    def infer(self, layer: Linear4bit, x: torch.Tensor, matmul, rows: list[int] | None = None) -> torch.Tensor:
        """`layer.infer(x, matmul)` with each row of x (the batch's `rows`, default all) under its adapter."""
        groups = self._all if rows is None else self._groups(rows)
        if len(groups) == 1:
            self.bank._apply(layer, next(iter(groups)))
            return layer.infer(x, matmul)
        if isinstance(matmul, dispatch.Matmul4bit) and x.dim() == 2:
            return self._shared_base(layer, x, matmul, groups)
        out = None
        for name, index in groups.items():
            self.bank._apply(layer, name)
            y = layer.infer(x[index], matmul)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[index] = y
        return out

    def _shared_base(self, layer: Linear4bit, x: torch.Tensor, matmul, groups: dict) -> torch.Tensor:
        """The 4-bit weight read once for all rows; the same steps, in float32, as `Linear4bit.infer`."""
        x_c = x if x.dtype == layer.compute_dtype else x.to(layer.compute_dtype)
        y = matmul(x_c, float32_out=True)
        if layer.bias is not None:
            y = y + layer.bias.float()
        x2 = x_c.float()
        held = self.bank._held[id(layer)]
        for name, index in groups.items():
            if held[name] is not None:
                a, b, scaling = held[name]
                y[index] = y[index] + matmul.matmul_f32(matmul.matmul_f32(x2[index], a.float()), b.float()) * scaling
        y = y.to(layer.compute_dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _load_saved_modules(model, saved: dict[str, torch.Tensor], directory) -> None:
    """Put whole saved embedding / head matrices in place, growing the vocabulary to their size."""
    from ..train.tokens import resize_vocab

    modules = dict(model.named_modules())
    rows = {t.shape[0] for t in saved.values()}
    for name, t in saved.items():
        if name not in modules or t.shape[1:] != modules[name].weight.shape[1:]:
            raise Nf4tuneError(f"the adapter in {directory} saves {name} {list(t.shape)}, which does not fit this model.")
    if len(rows) == 1 and next(iter(rows)) != model.get_input_embeddings().weight.shape[0]:
        resize_vocab(model, next(iter(rows)))
        modules = dict(model.named_modules())
    for name, t in saved.items():
        weight = modules[name].weight
        modules[name].weight = torch.nn.Parameter(t.to(weight.device, weight.dtype), requires_grad=False)
    if model.config.tie_word_embeddings and len(saved) == 1:
        model.tie_weights()
