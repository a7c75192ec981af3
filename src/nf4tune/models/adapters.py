"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, as PEFT writes them, so
`peft.PeftModel.from_pretrained(base, dir)` reads what `save_adapter` writes, and `load_adapter`
reads what PEFT writes.

Tokens added to the vocabulary travel as PEFT's `trainable_token_indices` (its TrainableTokens
layer): only their rows, `<module>.token_adapter.trainable_tokens_delta` (the rows' values, not a
difference), for the input embedding and, when untied, the output head; PEFT loads them onto a base
resized to the adapter's tokenizer (`base.resize_token_embeddings(len(tokenizer))`). Older nf4tune
adapters saved the whole matrices as `modules_to_save`; they still load.

Adapters on a mixture-of-experts model's fused expert weights are PEFT's `target_parameters` LoRA
(its ParamWrapper): `<experts module>.lora_A.weight` of shape (r * experts, in), where several targeted
parameters of one experts module nest, the module's first parameter innermost
(`<experts module>.base_layer.lora_A.weight`), as PEFT wraps them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import dispatch
from ..atomic import atomic_write
from ..errors import Nf4tuneError
from ..layers.experts4bit import EXPERT_PARAMETERS, ExpertWeight4bit, expert_weights
from ..layers.linear4bit import Linear4bit, lora_scaling
from ..layers.lora import LoraConfig, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
TOKEN_DELTA = "token_adapter.trainable_tokens_delta"
_TOKEN_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")


@dataclass
class VocabRows:
    """Rows an adapter sets in a vocabulary matrix (input embedding or output head): row
    `indices[i]` is `values[i]`; the vocabulary grows to hold the largest index."""

    indices: list[int]
    values: torch.Tensor  # (len(indices), hidden)

    @property
    def size(self) -> int:
        """The vocabulary size these rows need."""
        return max(self.indices) + 1

    def apply(self, weight: torch.Tensor) -> None:
        """Write the rows into `weight` in place (in its dtype)."""
        index = torch.tensor(self.indices, device=weight.device)
        with torch.no_grad():
            weight.index_copy_(0, index, self.values.to(weight.device, weight.dtype))

    def added_from(self, base_rows: int) -> "VocabRows":
        """Only the rows of tokens beyond the base vocabulary of `base_rows` rows."""
        keep = [i for i, row in enumerate(self.indices) if row >= base_rows]
        return VocabRows([self.indices[i] for i in keep], self.values[keep])


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


def _new_rows(model) -> list[int]:
    first = getattr(model, "nf4tune_new_tokens_from", None)
    return [] if first is None else list(range(first, model.get_input_embeddings().weight.shape[0]))


def _token_modules(model) -> dict[str, nn.Module]:
    """The modules whose new rows are saved, by name: the input embedding and the output head (both
    also when tied, as PEFT writes them: the head's rows are then the embedding's)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return {name: m for name, m in model.named_modules() if any(m is w for w in wanted if w is not None)}


def _trainable_token_indices(model) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for the added tokens: the embedding's rows, and the head's
    when it is not tied (PEFT ties a tied head's rows to the embedding's itself)."""
    rows = _new_rows(model)
    if not rows:
        return None
    return {name.rsplit(".", 1)[-1]: rows for name in _vocab_module_names(model)}


def expert_adapters(model) -> dict[str, tuple[str, ExpertWeight4bit]]:
    """The expert weights of `model` that carry an adapter, by the module name PEFT saves that adapter under:
    {"model.layers.0.mlp.experts.base_layer": ("model.layers.0.mlp.experts.gate_up_proj", weight), ...}."""
    found = {}
    for owner_name, owner in model.named_modules():
        targeted = [(attr, w) for attr in EXPERT_PARAMETERS
                    if isinstance(w := getattr(owner, attr, None), ExpertWeight4bit) and w.lora_A is not None]
        for depth, (attr, weight) in enumerate(reversed(targeted)):  # the last parameter wraps the others
            found[owner_name + ".base_layer" * depth] = (f"{owner_name}.{attr}", weight)
    return found


def _target_parameter(name: str) -> str:
    """PEFT's `target_parameters` entry for an expert weight: its name within its decoder layer
    ("mlp.experts.gate_up_proj"), or the whole name outside one."""
    match = re.match(r"^.*?\.\d+\.(.+)$", name)
    return match[1] if match else name


def adapter_config(model, layers: list[str], expert_names: list[str] = ()) -> dict:
    """PEFT's adapter_config.json for the adapters of `model` on `layers` and the expert weights `expert_names`."""
    cfg: LoraConfig = getattr(model, "nf4tune_lora_config", None) or LoraConfig()
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    experts = sorted({_target_parameter(n) for n in expert_names})
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "nf4tune_base", None) or getattr(model.config, "name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        # PEFT refuses dropout on expert adapters (it has none there); nf4tune's linear layers had it in training
        "lora_dropout": 0.0 if experts else cfg.dropout,
        "target_modules": sorted(layers) if layers or not experts else None,
        **({"target_parameters": experts} if experts else {}),
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "trainable_token_indices": _trainable_token_indices(model),
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model, directory: str | Path) -> Path:
    """Write the model's LoRA adapters to `directory` in PEFT's format (each file replaced atomically)."""
    layers = lora_layers(model)
    experts = expert_adapters(model)
    if not layers and not experts:
        raise Nf4tuneError("this model has no LoRA adapters to save; load it with lora=LoraConfig(...) or adapter=DIR.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    for name, (_, weight) in experts.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = weight.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = weight.lora_B.detach().contiguous().cpu()
    rows = _new_rows(model)
    if rows:  # only the added tokens' rows travel with the adapter
        for name, module in _token_modules(model).items():
            tensors[f"{PREFIX}{name}.{TOKEN_DELTA}"] = module.weight[rows[0]:].detach().float().cpu().clone()
    config = adapter_config(model, list(layers), [name for name, _ in experts.values()])
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, VocabRows]]:
    """(adapter_config, {module name: {"A": tensor, "B": tensor}}, {module name: VocabRows}) of a PEFT
    LoRA adapter folder; the rows are those of added tokens (`trainable_token_indices`), or whole
    matrices (`modules_to_save` of older nf4tune adapters: every row)."""
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
    saved: dict[str, VocabRows] = {}
    to_save = set(config.get("modules_to_save") or [])
    deltas = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is not None:
            pairs.setdefault(m["module"], {})[m["which"]] = t
            continue
        if (m := _TOKEN_KEY.match(key)) is not None:
            deltas[m["module"]] = t
            continue
        module = key.removeprefix(PREFIX).removesuffix(".weight")
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in to_save:
            saved[module] = VocabRows(list(range(t.shape[0])), t)
            continue
        raise Nf4tuneError(f"{directory}: tensor {key} is not a LoRA A/B weight nor a module_to_save; "
                           "adapters with biases are not supported yet.")
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise Nf4tuneError(f"{directory}: {name} has lora_{next(iter(pair))} but not its partner.")
    saved.update(_token_rows(config.get("trainable_token_indices"), deltas, directory))
    return config, pairs, saved


def _token_rows(indices, deltas: dict[str, torch.Tensor], directory) -> dict[str, VocabRows]:
    """PEFT's trainable-token rows by module. `indices` is a list (the input embedding's) or
    {module name or its last part: list}; a tied head saved without its own entry shares the embedding's."""
    if not deltas:
        return {}
    if isinstance(indices, list):
        indices = {"embed_tokens": indices}
    if not isinstance(indices, dict) or not indices:
        raise Nf4tuneError(f"{directory} saves token rows but its adapter_config.json has no trainable_token_indices.")

    def lookup(module: str):
        for key, rows in indices.items():
            if module == key or module.endswith("." + key):
                return rows
        return None

    found = {module: lookup(module) for module in deltas}
    fallback = next((rows for rows in found.values() if rows is not None), None)
    rows = {}
    for module, t in deltas.items():
        index = found[module] if found[module] is not None else fallback
        if index is None or len(index) != t.shape[0]:
            raise Nf4tuneError(f"{directory}: {module} saves {t.shape[0]} token rows but trainable_token_indices "
                               f"names {len(index or [])}; the adapter is damaged.")
        rows[module] = VocabRows([int(i) for i in index], t)
    return rows


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
    """Attach the LoRA adapters saved in `directory` (by nf4tune or PEFT) to `model`, checking they fit.

    The model then carries that adapter and no other: adapters it had on layers the saved one does not
    target are dropped (as PEFT loading onto a base model), and its rank, alpha and dropout are the
    saved adapter's. Only the adapters train (`requires_grad`); every other parameter is frozen.
    """
    config, pairs, saved = read_adapter(directory)
    if saved:
        _load_saved_modules(model, saved, directory)
    experts = _expert_pairs(model, pairs, config, directory)  # taken out of `pairs`
    _check_fits(model, pairs, config, directory)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in lora_layers(model).items():
        if name not in pairs:
            layer.remove_lora()
    for weight in modules.values():
        if isinstance(weight, ExpertWeight4bit):
            weight.remove_lora()
    lora = _lora_config(config, {**pairs, **{name: pair for name, (_, pair) in experts.items()}})
    for name, pair in pairs.items():
        layer = modules[name]
        layer.add_lora(pair["A"].shape[0], lora.alpha, lora.dropout, lora.use_rslora)  # rank from the tensors
        with torch.no_grad():
            layer.lora_A.copy_(pair["A"])
            layer.lora_B.copy_(pair["B"])
    for weight, pair in experts.values():
        weight.add_lora(pair["A"].shape[0] // weight.num_experts, lora.alpha, lora.use_rslora)
        with torch.no_grad():
            weight.lora_A.copy_(pair["A"])
            weight.lora_B.copy_(pair["B"])
    model.nf4tune_lora_config = lora
    return sorted(pairs) + sorted(experts)


def _expert_pairs(model, pairs: dict, config: dict, directory) -> dict[str, tuple[ExpertWeight4bit, dict]]:
    """The adapter's per-expert pairs (PEFT `target_parameters`), by expert weight name, removed from `pairs`;
    each checked to fit its weight."""
    targets = config.get("target_parameters") or []
    if not targets:
        return {}
    modules = dict(model.named_modules())
    found = {}
    for owner_name in {n.split(".base_layer")[0] for n in pairs}:
        owner = modules.get(owner_name)
        targeted = [(f"{owner_name}.{attr}", w) for attr in EXPERT_PARAMETERS
                    if isinstance(w := getattr(owner, attr, None), ExpertWeight4bit)
                    and any(f"{owner_name}.{attr}" == t or f"{owner_name}.{attr}".endswith(f".{t}") for t in targets)]
        for depth, (name, weight) in enumerate(reversed(targeted)):  # as `expert_adapters` names them
            pair = pairs.pop(owner_name + ".base_layer" * depth, None)
            if pair is None:
                continue
            a, b = pair["A"], pair["B"]
            if (a.shape[0] % weight.num_experts or a.shape[1] != weight.in_features
                    or b.shape != (weight.out_features, a.shape[0])):
                raise Nf4tuneError(
                    f"the adapter in {directory} does not fit this model: {name} is {weight.num_experts} experts of "
                    f"{weight.in_features}->{weight.out_features} but the adapter has A {list(a.shape)}, B "
                    f"{list(b.shape)}; it was trained on another base model (its base: "
                    f"{config.get('base_model_name_or_path')})."
                )
            found[name] = (weight, pair)
    return found


def pairs_by_module(model, config: dict, pairs: dict, directory) -> dict[str, dict[str, torch.Tensor]]:
    """`read_adapter`'s pairs keyed by the module of `model` holding `lora_A` / `lora_B`: a LoRA layer's name
    as read, an expert adapter's (PEFT `target_parameters`, keyed by the experts module and its `base_layer`s)
    by its `ExpertWeight4bit`'s name, e.g. "model.layers.0.mlp.experts.gate_up_proj". `pairs` is left as it was."""
    rest = dict(pairs)
    experts = _expert_pairs(model, rest, config, directory)
    return {**rest, **{name: pair for name, (_, pair) in experts.items()}}


class AdapterBank:
    """Several LoRA adapters held for one 4-bit base, switched in by reference (no copies, no merging).

        bank = AdapterBank(model, {"chat": "adapters/chat", "sql": "adapters/sql"})
        bank.activate("sql")   # or None for the base model alone
        rows = bank.rows(["sql", None, "chat"])   # a batch whose rows each have their own (see RowAdapters)
    """

    def __init__(self, model, adapters: dict[str, str | Path]):
        self.model = model
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        # A mixture of experts' per-expert adapters (PEFT `target_parameters`) switch like the layers' but only
        # for a whole batch (`activate`, as transformers' generate runs them): `RowAdapters` is the CPU
        # decoder's, which runs no experts.
        self.experts = expert_weights(model)
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.active: str | None = None
        # Vocabulary size per adapter (None: the base). One adapter may add tokens: the model's vocabulary
        # grows by its rows, the others keep the base's (their rows never see nor draw the added tokens),
        # and `tokenizer` is its tokenizer, which encodes the added tokens (else None: the base's).
        self.vocab: dict[str | None, int] = {None: model.get_input_embeddings().weight.shape[0]}
        self.tokenizer, self._adds_tokens = None, None
        for name, directory in adapters.items():
            config, pairs, saved = read_adapter(directory)
            experts = _expert_pairs(model, pairs, config, directory)  # taken out of `pairs`
            _check_fits(model, pairs, config, directory)
            self.vocab[name] = self._add_tokens(name, directory, saved) if saved else self.vocab[None]
            lora = _lora_config(config, pairs)
            pairs.update({module: pair for module, (_, pair) in experts.items()})
            self.adapters[name] = {}
            for module, pair in pairs.items():
                layer = self.layers.get(module) or self.experts[module]
                rank = pair["A"].shape[0] // getattr(layer, "num_experts", 1)
                device, dtype = layer.storage_device, torch.float32
                self.adapters[name][module] = (pair["A"].to(device, dtype), pair["B"].to(device, dtype),
                                               lora_scaling(lora.alpha, rank, lora.use_rslora))
        # per layer, per adapter: what the layer holds while it applies that adapter (None: nothing)
        self._held: dict[int, dict[str | None, tuple | None]] = {}
        for module, layer in {**self.layers, **self.experts}.items():
            held = self._held[id(layer)] = {None: None}
            for name, chosen in self.adapters.items():
                if module in chosen:
                    a, b, scaling = chosen[module]
                    held[name] = (nn.Parameter(a, False), nn.Parameter(b, False), scaling)
                else:
                    held[name] = None
        self.activate(None)

    def _add_tokens(self, name: str, directory, saved: dict[str, VocabRows]) -> int:
        """Grow the model's vocabulary by the rows of the tokens adapter `name` adds; its vocabulary size."""
        from ..checkpoint.hf import load_tokenizer

        if self._adds_tokens is not None:
            raise Nf4tuneError(f"the adapters {self._adds_tokens!r} and {name!r} both add tokens; one server holds one "
                               "such adapter (beside any number that keep the base vocabulary): serve the other "
                               "from a second server.")
        tokenizer = load_tokenizer(directory)
        if tokenizer is None:
            raise Nf4tuneError(f"the adapter {name!r} in {directory} adds tokens but has no tokenizer files; save the "
                               "tokenizer with the added tokens beside it (nf4tune train does).")
        base = self.vocab[None]
        _load_saved_modules(self.model, {m: rows.added_from(base) for m, rows in saved.items()}, directory)
        self.tokenizer, self._adds_tokens = tokenizer, name
        return self.model.get_input_embeddings().weight.shape[0]

    def vocab_size(self, name: str | None) -> int:
        """The vocabulary size of adapter `name` (None: the base model)."""
        return self.vocab[name]

    def _apply(self, layer: Linear4bit | ExpertWeight4bit, name: str | None) -> None:
        held = self._held[id(layer)][name]
        if held is None:
            layer.lora_A = layer.lora_B = None
            layer.r = 0
        else:
            layer.lora_A, layer.lora_B, layer.scaling = held
            layer.r = layer.lora_A.shape[0] // getattr(layer, "num_experts", 1)  # experts view A per expert by r

    def activate(self, name: str | None) -> None:
        """Make adapter `name` (None: none) the one every 4-bit layer applies."""
        self._check(name)
        for layer in (*self.layers.values(), *self.experts.values()):
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

    def own_vocab(self, logits: torch.Tensor, name: str | None) -> torch.Tensor:
        """A row's logits (vocab,) over its adapter's vocabulary only: an adapter that keeps the base
        vocabulary draws exactly as it would alone, never a token another adapter added."""
        size = self.bank.vocab_size(name)
        return logits if size == logits.shape[-1] else logits[:size]

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


def _load_saved_modules(model, saved: dict[str, VocabRows], directory) -> None:
    """Put an adapter's vocabulary rows in place, growing the vocabulary to hold them (the old rows
    stay; the new ones not named start at the mean of the old ones). A tied head shares the rows."""
    from .vocab import grow_rows

    modules = dict(model.named_modules())
    for name, rows in saved.items():
        if name not in modules or rows.values.shape[1:] != modules[name].weight.shape[1:]:
            raise Nf4tuneError(f"the adapter in {directory} saves {name} rows {list(rows.values.shape)}, "
                               "which do not fit this model.")
    size = max(rows.size for rows in saved.values())
    if size > model.get_input_embeddings().weight.shape[0]:
        grow_rows(model, size)
        modules = dict(model.named_modules())
    for name, rows in saved.items():
        rows.apply(modules[name].weight)
