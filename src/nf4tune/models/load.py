"""`load_model`: a Hugging Face checkpoint as a transformers model with 4-bit linear layers.

The model is built with its parameters on the meta device (no memory), its linear layers are
swapped for `Linear4bit`, and the safetensors shards are streamed in one tensor at a time: linear
weights are quantized as they arrive (on the target device), everything else is cast and placed.
The full 16-bit model never exists in memory. Pre-quantized `*-bnb-4bit` checkpoints are read as
they are, without bitsandbytes. With quant_type "none" the same layers are `Linear16bit`, which keep
their weights in the compute dtype (16-bit LoRA). A mixture of experts' fused expert parameters become
`ExpertWeight4bit`s (layers/experts4bit.py), quantized whole as they arrive; its checkpoint's per-expert
tensors are fused on the way in by transformers' own conversion rules (checkpoint/expert_keys.py).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint.architecture import matches_module, model_class, quantizable_linears, to_config
from ..checkpoint.bnb4bit import QuantizedWeightAssembler
from ..checkpoint.expert_keys import KeyConverter
from ..checkpoint.hf import has_tokenizer, iter_tensors, open_checkpoint, resolve
from ..errors import Nf4tuneError
from ..layers import chunked_attention
from ..layers.experts4bit import swap_experts
from ..layers.head import OutputHead
from ..layers.linear4bit import Linear4bit, Linear16bit
from ..layers.lora import LoraConfig, inject_lora
from ..layers.tiled_mlp import tile_mlps
from ..quant import quantize
from ..quant.tensor import QuantizedTensor
from ..registry import BASE_QUANT_TYPES, FAMILIES, LONG_CONTEXT_FAMILIES, UNQUANTIZED
from .checkpointing import enable_checkpointing
from .peft_compat import Nf4tuneState, attach

log = logging.getLogger("nf4tune")



@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (buffers stay real: rotary tables are computed in __init__)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device supports it (all CPUs, Ampere+ GPUs), else float16.

    On CPU, bfloat16 trained 1.8x faster than float32 on an AVX-512 CPU
    (BENCHMARKS.md); float32 remains available with compute_dtype=torch.float32.
    """
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _place(model: nn.Module, key: str, tensor: torch.Tensor, device, dtype, fp32_modules) -> bool:
    """Put `tensor` into the parameter or buffer `key` of `model`; False if the model has no such tensor."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if tensor.is_floating_point():
        dtype = torch.float32 if fp32_modules and matches_module(module_name, fp32_modules) else dtype
    else:
        dtype = tensor.dtype
    # Always a copy: safetensors tensors are views of the mmapped shard, and keeping one would keep
    # the whole shard's pages resident after it has been read.
    tensor = tensor.to(device=device, dtype=dtype, copy=True)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        return False
    return True


def load_model(
    path: str | Path,
    quant_type: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    lora: LoraConfig | None = None,
    adapter: str | Path | None = None,
    blocksize: int = 64,
    gradient_checkpointing: bool = True,
    progress: bool = True,
    layer_ready: Callable[[nn.Module, str], None] | None = None,
):
    """Load a causal LM (or T5) with every linear layer of its blocks in 4-bit.

    Args:
        path: a local checkpoint folder or a Hugging Face Hub id; 16-bit or `*-bnb-4bit`; or a
            GGUF file (or a folder holding one), dequantized tensor by tensor.
        quant_type, double_quant, blocksize: how 16-bit weights are quantized (ignored for a
            pre-quantized checkpoint, which keeps its own). quant_type None (or "none") keeps them
            unquantized in `compute_dtype` (16-bit LoRA): the same layers get LoRA, the same adapters
            load and save; a pre-quantized checkpoint's 4-bit weights are then dequantized.
        compute_dtype: dtype of activations and of the frozen matmuls; default bfloat16 where the
            device supports it, else float16.
        device: default CUDA if available, else CPU.
        lora: attach fresh adapters (trainable; everything else frozen).
        adapter: load adapters saved by `save_adapter` or by PEFT (overrides `lora`).
        gradient_checkpointing: recompute each decoder layer in backward (when training adapters).
        layer_ready: `layer_ready(model, name)` is called once the decoder layer `name` has all its
            tensors, while the checkpoint is still streaming (adapters are attached before streaming
            then): a distributed run shards the layer there, so that no rank ever holds every layer
            whole. Without it nothing changes.

    Returns:
        (model, tokenizer): a transformers `PreTrainedModel` in eval mode, and its tokenizer (None if
        the checkpoint has none).
    """
    from transformers import AutoTokenizer

    quant_type = UNQUANTIZED if quant_type is None else quant_type
    if quant_type not in BASE_QUANT_TYPES:
        raise Nf4tuneError(f"quant_type {quant_type!r} is not one of {', '.join(BASE_QUANT_TYPES)}.")
    path = resolve(path)
    ckpt = open_checkpoint(path)
    device = torch.device(device) if device is not None else default_device()
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(device)
        log.info("nf4tune: computing in %s on %s", str(compute_dtype).removeprefix("torch."), device)

    config = dict(ckpt.config)
    qcfg = config.pop("quantization_config", None)
    if qcfg is not None and not (qcfg.get("quant_method") == "bitsandbytes" and qcfg.get("load_in_4bit")):
        raise Nf4tuneError(
            f"{path} is quantized with {qcfg.get('quant_method')} (8-bit or another method); nf4tune reads 16-bit "
            "and bitsandbytes 4-bit checkpoints."
        )
    cfg = to_config(config)
    model_type = config.get("model_type")
    with _parameters_on_meta():
        model = model_class(cfg).from_config(cfg, dtype=compute_dtype)
    fp32_modules = set(getattr(model, "_keep_in_fp32_modules", None) or [])

    targets = quantizable_linears(model)
    keys = KeyConverter(model)  # before any swap: it reads the fused expert parameters' shapes
    if model_type not in FAMILIES:  # others: "every nn.Linear but the head", with a warning
        log.warning("nf4tune: %r is not a tested family; quantizing every nn.Linear but the output head: %s",
                    model_type, sorted({t.rsplit('.', 1)[-1] for t in targets}))
    layer_class = Linear16bit if quant_type == UNQUANTIZED else Linear4bit
    for name in targets:
        linear = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                layer_class(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype))
    experts = swap_experts(model, compute_dtype)  # MoE: each fused expert parameter -> ExpertWeight4bit
    store = _weight_store(quant_type, blocksize, double_quant, device)
    weight_keys = {f"{t}.weight": t for t in targets}
    if layer_ready is not None:  # the adapters exist before their layers are handed over
        _attach_adapters(model, path, lora, adapter, device=device)
    pending = _LayersPending(model, {**weight_keys, **dict.fromkeys(experts)}, layer_ready)

    assembler = QuantizedWeightAssembler(set(weight_keys) | set(experts) if qcfg is not None else set())
    unexpected: list[str] = []
    loaded: set[str] = set()
    storage = str(compute_dtype).removeprefix("torch.") if quant_type == UNQUANTIZED else "4-bit"
    with tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc=f"loading {path.name} ({storage})", disable=not progress) as bar:
        def take(key: str, tensor: torch.Tensor) -> None:
            if assembler.owner(key):
                done = assembler.add(key, tensor)
                if done:
                    owner, q = done
                    target = experts.get(owner) or model.get_submodule(weight_keys[owner])
                    target.set_weight(q.to(device) if quant_type != UNQUANTIZED or owner not in experts
                                      else q.to(device).dequantize(compute_dtype))
                    loaded.add(owner)
                    pending.loaded(owner)
            elif key in weight_keys:
                model.get_submodule(weight_keys[key]).set_weight(store(tensor, key))
                loaded.add(key)
                pending.loaded(key)
            elif key in experts:
                experts[key].set_weight(store(tensor, key))
                loaded.add(key)
                pending.loaded(key)
            elif _place(model, key, tensor, device, compute_dtype, fp32_modules):
                loaded.add(key)
                pending.loaded(key)
            else:
                unexpected.append(key)

        for shard in ckpt.shards:
            for key, tensor in iter_tensors(shard):
                bar.update(tensor.nbytes)
                for name, converted in keys.feed(key, tensor):
                    take(name, converted)
                del tensor
        for name, converted in keys.finish(path):
            take(name, converted)
        bar.update(bar.total - bar.n)  # sizes counted by tensor miss the files' headers: reach the total
    if unexpected:
        log.warning("nf4tune: %d checkpoint tensor(s) have no place in the model and were skipped: %s",
                    len(unexpected), ", ".join(unexpected[:5]))
    _finish(model, {**weight_keys, **dict.fromkeys(experts)}, loaded, device, path)

    if layer_ready is None:
        _attach_adapters(model, path, lora, adapter)
    model.nf4tune_base = str(path)
    if model_type in LONG_CONTEXT_FAMILIES:
        use_long_context_layers(model)
    if gradient_checkpointing and (adapter is not None or lora is not None):
        enable_checkpointing(model)
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        with contextlib.suppress(AttributeError, NotImplementedError):  # a model that cannot swap its head keeps it
            model.set_output_embeddings(OutputHead.wrap(head))
    model.eval()

    # An adapter trained with new tokens carries its tokenizer; otherwise the base model's is used.
    tokenizer = None
    if ckpt.gguf is not None and not (adapter is not None and has_tokenizer(Path(adapter))):
        from ..checkpoint.gguf import gguf_tokenizer

        return model, gguf_tokenizer(ckpt.gguf)
    for folder in ([Path(adapter)] if adapter is not None else []) + [path]:
        if has_tokenizer(folder):
            tokenizer = AutoTokenizer.from_pretrained(folder)
            break
    return model, tokenizer


def use_long_context_layers(model: nn.Module) -> None:
    """Long sequences without sequence x sequence memory: attention through `nf4tune_chunked` (transformers'
    sdpa below `chunked_attention.LONG_TOKENS` query tokens, blockwise above), and the layers' MLPs tiled
    over tokens in training from `tiled_mlp.TILE_TOKENS` tokens on. Short sequences run as before."""
    try:
        model.set_attn_implementation(chunked_attention.register())
    except ValueError as err:  # a model class that takes no registered attention keeps its own
        log.info("nf4tune: %s keeps its attention (%s)", type(model).__name__, err)
    tile_mlps(model)


def _weight_store(quant_type: str, blocksize: int, double_quant: bool,
                  device: torch.device) -> Callable[[torch.Tensor, str], torch.Tensor | QuantizedTensor]:
    """How a linear weight read from the checkpoint is stored: quantized on `device`, or (quant_type
    "none") as it is, on `device` (the layer casts it to the compute dtype)."""
    if quant_type == UNQUANTIZED:
        return lambda tensor, key: tensor.to(device)  # Linear16bit.set_weight copies it off the mmapped shard
    return lambda tensor, key: quantize(tensor.to(device), quant_type, blocksize, double_quant, name=key)


def _attach_adapters(model: nn.Module, path: Path, lora: LoraConfig | None, adapter,
                     device: torch.device | None = None) -> None:
    """Fresh adapters (`lora`) or saved ones (`adapter`), on the model's device."""
    # With adapters, the model is what Trainer / TRL scripts expect of a PEFT model; with or without, PEFT's
    # entry points on it (get_peft_model, PeftModel.from_pretrained) are answered by nf4tune (models/peft_compat.py).
    attach(model, Nf4tuneState(base=str(path), lora_config=lora))
    if adapter is None and lora is None:
        return
    # Before the weights arrive the layers have no device: the adapters are then made on the target
    # one (the same random draws as after loading).
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if adapter is not None:
            from .adapters import load_adapter

            load_adapter(model, adapter)
        else:
            inject_lora(model, lora)


class _LayersPending:
    """The tensors each decoder layer still waits for; calls `layer_ready(model, name)` as one completes."""

    def __init__(self, model: nn.Module, weight_keys: dict[str, str], layer_ready):
        self.model, self.layer_ready, self.waiting = model, layer_ready, {}
        layers = getattr(getattr(model, getattr(model, "base_model_prefix", ""), None), "layers", None)
        if layer_ready is None or layers is None:
            return
        prefix = f"{model.base_model_prefix}.layers."
        for i, layer in enumerate(layers):
            name = f"{prefix}{i}"
            need = {f"{name}.{n}" for n, p in layer.named_parameters() if p.device.type == "meta"}
            need |= {k for k in weight_keys if k.startswith(name + ".")}
            self.waiting[name] = need
        self._of = {k: name for name, keys in self.waiting.items() for k in keys}

    def loaded(self, key: str) -> None:
        name = self._of.get(key) if self.waiting else None
        if name is None:
            return
        need = self.waiting[name]
        need.discard(key)
        if not need:
            del self.waiting[name]
            self.layer_ready(self.model, name)


def _finish(model: nn.Module, weight_keys: dict[str, str], loaded: set[str], device, path) -> None:
    """Tie shared weights, move the remaining buffers, and refuse a model with missing tensors."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing_linear = [k for k in weight_keys if k not in loaded]
    missing = missing_linear + [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise Nf4tuneError(
            f"{path} lacks {len(missing)} tensor(s) the model needs (first: {missing[0]}); the checkpoint is "
            "incomplete or belongs to another architecture."
        )
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
