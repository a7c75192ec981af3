"""Training recipes: YAML into typed dataclasses, with `key=value` overrides, checked before anything loads.

Keys inside `training` follow Hugging Face `TrainingArguments` where one exists, so QLoRA users find
`per_device_train_batch_size`, `learning_rate`, `lr_scheduler_type` where they expect them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Nf4tuneError
from ..layers.lora import LoraConfig
from ..registry import BASE_QUANT_TYPES, COMPUTE_DTYPES, OPTIMIZERS, PARALLEL_STRATEGIES

REQUIRED = object()  # marks fields a recipe must set


@dataclass
class ModelSection:
    name_or_path: str = REQUIRED  # type: ignore[assignment]
    compute_dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gradient_checkpointing: bool = True
    add_tokens: list[str] = field(default_factory=list)
    add_special_tokens: list[str] = field(default_factory=list)
    # A mixture of experts' load-balancing loss (transformers' name): router_aux_loss_coef (the config's) times
    # it is added to the training loss, as transformers adds it. Off by default, as in transformers.
    output_router_logits: bool = False


@dataclass
class QuantSection:
    quant_type: str = "nf4"  # a name in registry.BASE_QUANT_TYPES: a 4-bit type, or "none" (16-bit LoRA)
    double_quant: bool = True
    blocksize: int = 64


@dataclass
class DataSection:
    path: str = REQUIRED  # type: ignore[assignment]  # a .jsonl/.json/.csv/.parquet file, or a Hub dataset name
    format: str = "auto"  # auto, or one of train.formats.FORMATS (alpaca, oasst1, prompt_completion, messages, ...)
    split: str = "train"
    source_max_len: int = 512
    target_max_len: int = 256
    train_on_source: bool = False
    group_by_length: bool = False
    packing: bool = False
    on_bad_row: str = "error"  # error | skip
    max_samples: typing.Optional[int] = None


@dataclass
class TrainingSection:
    output_dir: str = REQUIRED  # type: ignore[assignment]
    overwrite_output_dir: bool = False  # a folder holding a run: move it to OUTPUT.old-<time> (else refused)
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    # Rows of tokens added to the vocabulary (model.add_tokens / add_special_tokens) start at the mean of
    # the old rows and must move far to be predicted: they get their own learning rate (as Unsloth's
    # embedding_learning_rate); None: 5e-3 or learning_rate, whichever is larger.
    embedding_learning_rate: typing.Optional[float] = None
    lr_scheduler_type: str = "constant"  # constant | linear | cosine (all with warmup)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 0.3
    logging_steps: int = 10
    save_steps: int = 500
    eval_steps: typing.Optional[int] = None
    save_total_limit: typing.Optional[int] = None
    seed: int = 42
    optim: str = "paged_adamw_32bit"  # a name in optim.OPTIMIZERS
    max_bad_steps_in_a_row: int = 5
    loss_chunk_tokens: int = 1024
    parallel: str = "auto"  # auto | ddp | fsdp: how several ranks (torchrun) share the work; see train/parallel.py
    fsdp_cpu_offload: bool = False  # FSDP: keep sharded parameters in host memory between uses
    # compile each decoder layer with torch.compile: true | false | auto (on CUDA only); see train/compile.py
    compile: typing.Union[bool, str] = "auto"
    # keep each checkpointed layer's input in (pinned) host memory until backward: true | false | auto (on CUDA,
    # for sequences from train.offload.AUTO_MIN_SEQ_LEN tokens); see train/offload.py
    offload_activations: typing.Union[bool, str] = "auto"


@dataclass
class EvalSection:
    path: typing.Optional[str] = None  # a held-out file; without it `size` rows are split off the training data
    size: float = 0  # rows (>= 1) or a fraction (< 1) of the training data held out
    per_device_eval_batch_size: int = 4
    max_eval_samples: typing.Optional[int] = None
    exact_match: bool = False  # also measure greedy exact-match accuracy on the held-out rows, before and after
    # scored at every eval_steps and at the end, e.g. [{task: multiple_choice, data: cais/mmlu, shots: 5}];
    # see nf4tune.evaluate.benchmarks.BenchmarkSpec for the keys
    benchmarks: list[dict] = field(default_factory=list)


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    training: TrainingSection
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraConfig = field(default_factory=LoraConfig)  # the section is the library's LoraConfig itself
    eval: EvalSection = field(default_factory=EvalSection)


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "training": TrainingSection,
                    "quant": QuantSection, "lora": LoraConfig, "eval": EvalSection}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(options))}."


def _check_type(where: str, value, hint):
    """Return `value` as the type `hint` asks for, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(where, value, arg)
            except Nf4tuneError as e:
                errors.append(e)
        raise errors[-1]
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            raise Nf4tuneError(f"{where} must be a list, got the string {value!r}; write [{value}].")
        if not isinstance(value, list):
            raise Nf4tuneError(f"{where} must be a list, got {type(value).__name__} {value!r}.")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and math.isnan(value):  # NaN compares false with every bound
        raise Nf4tuneError(f"{where} must be a number, got nan.")
    if hint is bool and not isinstance(value, bool):
        raise Nf4tuneError(f"{where} must be true or false, got {value!r}.")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise Nf4tuneError(f"{where} must be an integer, got {value!r}.")
    if hint in (float, str) and not isinstance(value, hint):
        raise Nf4tuneError(f"{where} must be a {'number' if hint is float else 'string'}, got {value!r}.")
    return value


def _build_section(name: str, cls, values) -> object:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise Nf4tuneError(f"recipe section {name!r} must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise Nf4tuneError(f"unknown key {name}.{key}{_closest(key, known)}")
        kwargs[key] = _check_type(f"{name}.{key}", value, hints[key])
    for key, f in known.items():
        if f.default is REQUIRED and key not in kwargs:
            raise Nf4tuneError(f"the recipe must set {name}.{key}.")
    try:
        return cls(**kwargs)
    except Nf4tuneError as e:  # a section's own check (LoraConfig's), named by its recipe section
        raise Nf4tuneError(f"recipe section {name!r}: {e}") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """'training.learning_rate=1e-4' -> (['training', 'learning_rate'], 0.0001); values are YAML."""
    import yaml

    if "=" not in text:
        raise Nf4tuneError(f"override {text!r} is not key=value (e.g. training.learning_rate=1e-4).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise Nf4tuneError(f"override {text!r}: the value is not valid YAML ({e}).") from e
    return key.strip().split("."), value


def recipe_from_dict(raw: dict, overrides: list[str] = ()) -> Recipe:
    """Validate a recipe dict (and overrides) into a `Recipe`."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2:
            raise Nf4tuneError(f"override {text!r} must name section.key (e.g. training.max_steps=100).")
        section, key = path
        if section not in _SECTION_CLASSES:
            raise Nf4tuneError(f"unknown recipe section {section!r}{_closest(section, _SECTION_CLASSES)}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][key] = value
    for section in raw:
        if section not in _SECTION_CLASSES:
            raise Nf4tuneError(f"unknown recipe section {section!r}{_closest(section, _SECTION_CLASSES)}")
    for section in ("model", "data", "training"):
        if section not in raw:
            raise Nf4tuneError(f"the recipe has no {section!r} section.")
    recipe = Recipe(**{name: _build_section(name, cls, raw.get(name)) for name, cls in _SECTION_CLASSES.items()})
    _check_values(recipe)
    return recipe


def _check_values(r: Recipe) -> None:
    def one_of(where, value, options):
        if value not in options:
            names = [str(o).lower() if isinstance(o, bool) else o for o in options]
            raise Nf4tuneError(f"{where} is {value!r}; use one of {', '.join(names)}.")

    one_of("quant.quant_type", r.quant.quant_type, BASE_QUANT_TYPES)
    one_of("data.on_bad_row", r.data.on_bad_row, ["error", "skip"])
    one_of("training.lr_scheduler_type", r.training.lr_scheduler_type, ["constant", "linear", "cosine"])
    one_of("training.optim", r.training.optim, list(OPTIMIZERS))
    one_of("training.parallel", r.training.parallel, ["auto", *PARALLEL_STRATEGIES])
    one_of("training.compile", r.training.compile, ["auto", True, False])
    one_of("training.offload_activations", r.training.offload_activations, ["auto", True, False])
    if r.training.offload_activations is True and not r.model.gradient_checkpointing:
        raise Nf4tuneError("training.offload_activations moves the layer inputs that gradient checkpointing keeps; "
                           "set model.gradient_checkpointing: true with it.")
    one_of("model.compute_dtype", r.model.compute_dtype, ["auto", *COMPUTE_DTYPES])
    for where, value in [("training.per_device_train_batch_size", r.training.per_device_train_batch_size),
                         ("training.gradient_accumulation_steps", r.training.gradient_accumulation_steps),
                         ("training.logging_steps", r.training.logging_steps), ("training.save_steps", r.training.save_steps),
                         ("data.source_max_len", r.data.source_max_len), ("data.target_max_len", r.data.target_max_len)]:
        if value <= 0:
            raise Nf4tuneError(f"{where} must be positive, got {value}.")
    for where, value in [("training.learning_rate", r.training.learning_rate),
                         ("training.embedding_learning_rate", r.training.embedding_learning_rate)]:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise Nf4tuneError(f"{where} must be a finite number, 0 or more, got {value}.")
    if r.training.max_steps <= 0 and r.training.num_train_epochs <= 0:
        raise Nf4tuneError("set training.max_steps or training.num_train_epochs to a positive number.")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe file and apply `key=value` overrides."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise Nf4tuneError(f"recipe {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise Nf4tuneError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise Nf4tuneError(f"recipe {path} must be a mapping of sections (model, data, training, ...).")
    recipe = recipe_from_dict(raw, overrides)
    # Data files named relative to the recipe are found beside it, wherever the command runs.
    for section, key in (("data", "path"), ("eval", "path")):
        obj = getattr(recipe, section)
        value = getattr(obj, key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (path.parent / value).exists():
            setattr(obj, key, str(path.parent / value))
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
