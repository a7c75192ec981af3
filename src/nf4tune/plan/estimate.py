"""`estimate`: how much GPU memory a QLoRA fine-tune with nf4tune takes, from config.json alone.

The model is built on the meta device (no weights) so every parameter is counted exactly; what
training adds is sized the way nf4tune trains:
  - quantized linear weights: 4 bits each, plus their constants (4.127 bits in all with NF4 double
    quantization at block size 64, 4.5 without); a mixture of experts' fused experts (transformers 5
    holds each layer's experts as 3-D parameters, `mlp.experts.gate_up_proj` and `down_proj`) are
    quantized the same way, while the router stays in the compute dtype;
  - everything else (embeddings, norms, routers, output head) in the compute dtype (`compute_dtype`: 2 bytes
    for bfloat16 and float16, the default, 4 for float32);
  - LoRA A and B in float32 (the optimizer's master copy) and their float32 gradients; on fused experts
    LoRA is per expert, as PEFT's `target_parameters` holds it (for E experts: A of E x r x in, B of
    E x out x r);
  - AdamW states: 8 bytes per LoRA parameter (32-bit) or about 2.03 (8-bit); paged optimizers can
    move them to host memory, so the total is given with and without them;
  - activations, in the compute dtype: with gradient checkpointing, each decoder layer's input plus one layer
    recomputed in full; without it every layer's. A layer keeps about 12 hidden-size and 4
    intermediate-size values per token (norm inputs and outputs, q/k/v, attention output, the
    MLP's gate, up, activation and product). In a mixture-of-experts layer only the active experts
    (`num_experts_per_tok`) see a token: each keeps 3 hidden-size values (its gathered input, output
    and weighted output) and 4 of its own intermediate size, a shared expert 4 of its size, and the
    router its float32 logits and probabilities over all experts;
  - long sequences: memory grows with the sequence, never its square. Attention is memory-efficient
    (flash kernels; nf4tune's chunked attention for masked long sequences holds float32 score blocks
    of heads x BLOCK x BLOCK, counted); where nf4tune's long-context layers are present for the family
    (`long_context_layers`), an MLP over `TILE_TOKENS` tokens keeps its intermediate values for one chunk
    of tokens only, and the kept outputs' budget shrinks as 1 / tokens past its full-budget length;
  - while backward runs through a layer, the gradients in flight beside its activations: about
    `BACKWARD_HIDDEN_VALUES` hidden-size values per token (measured on CPU);
  - with checkpointing also the 4-bit layers' outputs kept for the recompute (`layers.kept_outputs`: up to
    5 x hidden + half the MLP's intermediate values per token and layer, at most its budget) and, on CPU
    where the long-context layers are present, each layer's attention output and float32 log-sum-exp (hidden
    + heads values per token and layer, first within the budget and beyond it up to the unshrunk budget);
  - logits: the chunked loss holds 1024 tokens x vocabulary of float32 logits, their softmax and
    gradient, never batch x sequence x vocabulary;
  - 0.75 GiB for the CUDA context and allocator slack (none for a CPU run, `device="cpu"`, where the
    optimizer states are in host memory anyway and so always counted).
These are estimates: BENCHMARKS.md compares them with measured peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint.architecture import build_meta_model, quantizable_linears
from ..errors import Nf4tuneError
from ..layers import kept_outputs
from ..layers.kept_outputs import DEFAULT_BUDGET_GIB as KEPT_BUDGET_GIB
from ..quant.codes import bits_per_parameter
from ..registry import (
    AUTO_COMPUTE_DTYPE_BYTES,
    BASE_QUANT_TYPES,
    COMPUTE_DTYPES,
    ESTIMATE_DEVICES,
    OPTIMIZERS,
    PARALLEL_STRATEGIES,
    UNQUANTIZED,
)

GIB = 2**30
GPUS_GB = (24, 40, 48, 80)
CUDA_OVERHEAD = 0.75 * GIB
LOSS_CHUNK_TOKENS = 1024
# Gradients in flight while backward runs through a layer (of its output, the residual stream, the norms'
# float32 upcasts, q/k/v), in hidden-size values per token: measured on CPU (BENCHMARKS.md, estimate accuracy).
BACKWARD_HIDDEN_VALUES = 10
MAX_SEQ_STEP = 256  # `--max-seq-len` answers in multiples of this
MAX_SEQ_LIMIT = 2**22  # and searches no further
HEADROOM = 0.9  # `auto` picks DDP when one replica needs at most this share of a device's memory


@dataclass
class Estimate:
    """Bytes per component, and what the totals mean."""

    model_type: str
    parameters: int
    quantized_parameters: int
    lora_parameters: int
    expert_parameters: int  # of the quantized ones, in fused experts (0 for a dense model)
    expert_lora_parameters: int  # of the LoRA ones, on fused experts
    experts: int  # per mixture-of-experts layer (0: dense)
    experts_per_token: int
    weights_4bit: float
    quant_constants: float
    weights_16bit: float
    lora: float
    gradients: float
    optimizer_states: float
    optimizer_pageable: bool
    activations: float
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    kept_outputs: float
    logits: float
    overhead: float
    total: float
    total_without_paged_states: float
    device: str = "cuda"
    compute_dtype: str = "bfloat16"
    quant_type: str = "nf4"

    def fits(self) -> dict[int, bool]:
        """For 24/40/48/80 GB cards: whether the run fits (paged states may live on the host); a CPU run: {}."""
        if self.device == "cpu":
            return {}
        need = self.total_without_paged_states
        return {gb: need <= gb * GIB for gb in GPUS_GB}

    def as_json(self) -> dict:
        return {**asdict(self), "fits_gb": {str(k): v for k, v in self.fits().items()}}


def _config(model: str) -> dict:
    import json

    path = Path(model)
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise Nf4tuneError(f"{path} has no config.json; give a Hugging Face model folder or Hub id.")
    elif path.suffix == ".json" and path.is_file():
        file = path
    elif path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise Nf4tuneError(f"{model} is neither a model folder, a config.json nor a Hub id.")
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(str(model), "config.json"))
        except Exception as e:
            raise Nf4tuneError(f"the config of {model} could not be downloaded ({str(e).splitlines()[0]}).") from e
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise Nf4tuneError(f"{file} is not valid JSON ({e}).") from e


@dataclass
class ExpertBlock:
    """One layer's fused experts, as the meta model holds them (3-D parameters, experts first)."""

    name: str  # the experts module, e.g. model.layers.0.mlp.experts
    weights: dict[str, tuple[int, ...]]  # parameter name -> shape (E, out, in) or (E, in, out)
    experts: int
    intermediate: int  # one expert's intermediate size
    shared_intermediate: int  # a shared expert's (or several's, together) beside them; 0 without
    top_k: int

    @property
    def parameters(self) -> int:
        return sum(e * a * b for e, a, b in self.weights.values())

    def lora(self, r: int, wanted: set[str] | None) -> int:
        """Per-expert LoRA on the weights `wanted` names (None: all), as PEFT's `target_parameters` holds it."""
        return sum(e * r * (a + b) for name, (e, a, b) in self.weights.items()
                   if wanted is None or name.rsplit(".", 1)[-1] in wanted or "experts" in wanted)

    def values_per_token(self, hidden: int) -> int:
        """Activation values one token leaves in this mixture-of-experts MLP (compute dtype)."""
        return self.top_k * (3 * hidden + 4 * self.intermediate) + 4 * self.shared_intermediate


TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", "top_k")


def expert_blocks(meta, hidden: int) -> list[ExpertBlock]:
    """The fused experts of each mixture-of-experts layer of `meta` (a model on the meta device): the modules
    holding 3-D parameters. Sizes come from the shapes (every family stores gate, up and down, so one expert
    holds 3 x hidden x intermediate weights), the top-k from the config, any shared expert from the linear
    layers beside the experts that write hidden-size outputs (its down projection)."""
    modules = dict(meta.named_modules())
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, param in meta.named_parameters():
        if param.dim() == 3:
            owner = name.rsplit(".", 1)[0]
            found.setdefault(owner, {})[name] = tuple(param.shape)
    if not found:
        return []
    cfg = meta.config
    top_k = next((getattr(cfg, n) for n in TOP_K_NAMES if isinstance(getattr(cfg, n, None), int)), None)
    if not top_k:
        raise Nf4tuneError(f"cannot size the {cfg.model_type!r} experts: its config names no number of experts per "
                           f"token ({', '.join(TOP_K_NAMES)}).")
    blocks = []
    for owner, weights in found.items():
        experts = next(iter(weights.values()))[0]
        per_expert = sum(a * b for _, a, b in weights.values())
        parent = modules.get(owner.rsplit(".", 1)[0]) if "." in owner else None
        shared = sum(m.in_features for m in (parent.modules() if parent is not None else ())
                     if type(m) is torch.nn.Linear and m.out_features == hidden)
        blocks.append(ExpertBlock(owner, weights, experts, max(1, per_expert // (3 * hidden)), shared, min(top_k, experts)))
    return blocks


def kept_budget_bytes(tokens: int) -> float:
    """The budget `layers.kept_outputs` gives the 4-bit outputs it keeps for the recompute, at `tokens` tokens
    (its default budget; where the layer shrinks it for long steps, shrunk the same way)."""
    return kept_outputs.budget_bytes(KEPT_BUDGET_GIB, tokens)


def kept_attention_bytes(sizes: "ModelSizes", width: int, tokens: int, device: str) -> float:
    """What a CPU step's causal attention keeps for the recompute (`layers.chunked_attention`: up to the
    unshrunk budget, whatever the length): each layer's output in the compute dtype (sized as hidden values
    per token, heads x head size in most families) and log-sum-exp in float32; nothing on a GPU."""
    if device != "cpu" or not long_context_layers(sizes.model_type):
        return 0.0
    per_token = sizes.layers * (width * sizes.hidden + 4 * sizes.heads)
    return min(KEPT_BUDGET_GIB * 2**30, per_token * tokens)


def long_context_layers(model_type: str) -> tuple[int, int] | None:
    """(tokens from which, tokens per chunk) the MLPs of `model_type` run tiled over tokens in training
    (`layers.tiled_mlp`), or None where they do not (a family without nf4tune's long-context layers)."""
    from ..layers.tiled_mlp import CHUNK_TOKENS, TILE_TOKENS
    from ..registry import LONG_CONTEXT_FAMILIES

    return (TILE_TOKENS, CHUNK_TOKENS) if model_type in LONG_CONTEXT_FAMILIES else None


def compute_dtype_bytes(name: str) -> int:
    """Bytes per element of `model.compute_dtype` (a name, or "auto" as a recipe's default)."""
    if name == "auto":
        return AUTO_COMPUTE_DTYPE_BYTES
    if name not in COMPUTE_DTYPES:
        raise Nf4tuneError(f"--compute-dtype {name!r}: use one of {', '.join(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[name]


@dataclass
class ModelSizes:
    """What `estimate` reads from a model's config (through the model built on the meta device) for one LoRA
    target: everything that does not depend on the sequence length, the rank or the dtypes."""

    model_type: str
    target: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    max_positions: int | None
    parameters: int
    quantizable: int  # linear weights and fused experts: what a 4-bit base quantizes
    expert_parameters: int
    lora_per_rank: int  # LoRA parameters per unit of rank
    expert_lora_per_rank: int
    blocks: list[ExpertBlock]

    def layer_bytes(self, width: int, tokens: int) -> list[int]:
        """Activation bytes each decoder layer keeps in full for a step of `tokens` tokens (its MLP's intermediate
        values and the rest), at `width` bytes per compute-dtype value; a mixture-of-experts layer's router adds
        float32 logits and probabilities over all its experts. An MLP tiled over tokens (`long_context_layers`)
        keeps its intermediate values for one chunk of tokens at a time."""
        tiled = long_context_layers(self.model_type)
        mlp_tokens = min(tokens, tiled[1]) if tiled and tokens >= tiled[0] else tokens
        dense = [width * (12 * self.hidden * tokens + 4 * self.intermediate * mlp_tokens)] * (self.layers - len(self.blocks))
        return dense + [(width * (12 * self.hidden + b.values_per_token(self.hidden)) + 8 * b.experts) * tokens
                        for b in self.blocks]

    def attention_blocks(self, batch: int, seq_len: int) -> int:
        """Bytes of the float32 score blocks (scores, probabilities, their gradient) nf4tune's chunked attention
        holds at a time for a masked long sequence (padding, packed rows): a plain causal mask holds none."""
        from ..layers.chunked_attention import BLOCK, LONG_TOKENS

        if not long_context_layers(self.model_type) or seq_len < LONG_TOKENS:
            return 0
        return 3 * 4 * batch * self.heads * BLOCK * BLOCK

    def kept_values(self) -> int:
        """4-bit outputs per token kept for the recompute, all layers: q, k, v, o and down (5 x hidden) and half the
        MLP's intermediate values (gate and up)."""
        dense = (5 * self.hidden + 2 * self.intermediate) * (self.layers - len(self.blocks))
        return dense + sum(5 * self.hidden + b.values_per_token(self.hidden) // 2 for b in self.blocks)


def model_sizes(model: str, target: str = "all-linear") -> ModelSizes:
    """Read `model`'s config (folder, config.json or Hub id) and size it for LoRA on `target`."""
    config = _config(model)
    meta = build_meta_model(config)
    cfg = meta.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "d_ff", None) or getattr(cfg, "ffn_dim", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not all((hidden, layers, inter, vocab)):
        raise Nf4tuneError(f"cannot size the {config.get('model_type')!r} architecture: its config lacks hidden, "
                           "layer, intermediate or vocabulary sizes.")
    linears = quantizable_linears(meta)
    modules = dict(meta.named_modules())
    blocks = expert_blocks(meta, hidden)
    experts = sum(b.parameters for b in blocks)
    wanted = None if target == "all-linear" else {t.strip() for t in target.split(",")}
    lora_experts = sum(b.lora(1, wanted) for b in blocks)
    lora = lora_experts + sum(modules[n].in_features + modules[n].out_features for n in linears
                              if wanted is None or n.rsplit(".", 1)[-1] in wanted)
    if lora == 0:
        raise Nf4tuneError(f"--target {target!r} matches no linear layer of this model.")
    return ModelSizes(
        model_type=config.get("model_type", "?"), target=target, hidden=hidden, layers=layers, intermediate=inter,
        vocab=vocab, heads=getattr(cfg, "num_attention_heads", None) or 1,
        max_positions=getattr(cfg, "max_position_embeddings", None), parameters=sum(p.numel() for p in meta.parameters()),
        quantizable=sum(modules[n].weight.numel() for n in linears) + experts, expert_parameters=experts,
        lora_per_rank=lora, expert_lora_per_rank=lora_experts, blocks=blocks)


def estimate(model: str | ModelSizes, seq_len: int = 2048, batch: int = 1, r: int = 64, target: str = "all-linear",
             optim: str = "paged_adamw_32bit", checkpointing: bool = True, gpus: int = 1,
             double_quant: bool = True, blocksize: int = 64, strategy: str = "fsdp", device: str = "cuda",
             compute_dtype: str = "bfloat16", quant_type: str = "nf4") -> Estimate:
    """Estimate the GPU memory of fine-tuning `model` (folder, config.json or Hub id, or its `model_sizes` for
    `target`, read once for many estimates) with nf4tune, per GPU: with `strategy="fsdp"` weights, adapters,
    gradients and optimizer states are split across `gpus`; with "ddp" every GPU holds all of them.
    `device="cpu"` sizes a CPU run (per process): no CUDA context, and no optimizer states paged out.
    `compute_dtype` sizes the unquantized weights and the activations (LoRA's float32 masters and the float32
    logits do not depend on it). quant_type "none" (16-bit LoRA) keeps the linear weights and experts in the
    compute dtype as well. Nothing here touches a device."""
    if seq_len <= 0 or batch <= 0 or r <= 0 or gpus <= 0:
        raise Nf4tuneError(f"--seq-len, --batch, --r and --gpus must be positive (got {seq_len}, {batch}, {r}, {gpus}).")
    if strategy not in PARALLEL_STRATEGIES:
        raise Nf4tuneError(f"--strategy {strategy!r}: use one of {', '.join(PARALLEL_STRATEGIES)}.")
    if device not in ESTIMATE_DEVICES:
        raise Nf4tuneError(f"--device {device!r}: use one of {', '.join(ESTIMATE_DEVICES)}.")
    if quant_type not in BASE_QUANT_TYPES:
        raise Nf4tuneError(f"--quant-type {quant_type!r}: use one of {', '.join(BASE_QUANT_TYPES)}.")
    if optim not in OPTIMIZERS:
        raise Nf4tuneError(f"--optim {optim!r}: use one of {', '.join(OPTIMIZERS)}.")
    width = compute_dtype_bytes(compute_dtype)
    sizes = model if isinstance(model, ModelSizes) else model_sizes(model, target)
    if sizes.target != target:
        raise ValueError(f"these model sizes are for --target {sizes.target!r}, not {target!r}")
    hidden, layers, blocks = sizes.hidden, sizes.layers, sizes.blocks
    # 16-bit LoRA quantizes nothing: its linear weights are sized with the other compute-dtype weights
    quantized = 0 if quant_type == UNQUANTIZED else sizes.quantizable
    total_params, lora, lora_experts = sizes.parameters, r * sizes.lora_per_rank, r * sizes.expert_lora_per_rank

    tokens = seq_len * batch
    layer_bytes = sizes.layer_bytes(width, tokens)
    # what backward holds beside them while it runs through a layer: the gradients in flight, score blocks
    in_flight = BACKWARD_HIDDEN_VALUES * width * hidden * tokens + sizes.attention_blocks(batch, seq_len)
    full = sum(layer_bytes) + in_flight
    checkpointed = layers * width * hidden * tokens + max(layer_bytes) + in_flight
    attention_kept = kept_attention_bytes(sizes, width, tokens, device)  # first, then 4-bit outputs in what is left
    kept = max(attention_kept, min(kept_budget_bytes(tokens), width * sizes.kept_values() * tokens + attention_kept)
               ) if checkpointing else 0.0
    logits = 3 * 4 * min(tokens, LOSS_CHUNK_TOKENS) * sizes.vocab

    shard = 1 / gpus if strategy == "fsdp" else 1.0  # FSDP splits weights, adapters, states; activations stay per GPU
    est = Estimate(
        model_type=sizes.model_type, parameters=total_params, quantized_parameters=quantized,
        lora_parameters=lora, expert_parameters=sizes.expert_parameters if quant_type != UNQUANTIZED else 0,
        expert_lora_parameters=lora_experts, experts=blocks[0].experts if blocks else 0,
        experts_per_token=blocks[0].top_k if blocks else 0,
        weights_4bit=quantized * 0.5 * shard,
        quant_constants=quantized * (bits_per_parameter(blocksize, double_quant) - 4) / 8 * shard,
        weights_16bit=(total_params - quantized) * width * shard,
        lora=lora * 4 * shard, gradients=lora * 4 * shard, optimizer_states=lora * OPTIMIZERS[optim].state_bytes * shard,
        optimizer_pageable=OPTIMIZERS[optim].pageable and device == "cuda",
        activations=checkpointed if checkpointing else full,
        activations_without_checkpointing=full, activations_with_checkpointing=checkpointed, kept_outputs=kept,
        logits=logits, overhead=CUDA_OVERHEAD if device == "cuda" else 0.0, total=0.0, total_without_paged_states=0.0,
        device=device, compute_dtype="bfloat16 or float16" if compute_dtype == "auto" else compute_dtype,
        quant_type=quant_type,
    )
    base = (est.weights_4bit + est.quant_constants + est.weights_16bit + est.lora + est.gradients
            + est.activations + est.kept_outputs + est.logits + est.overhead)
    est.total = base + est.optimizer_states
    est.total_without_paged_states = base if est.optimizer_pageable else est.total
    return est


def needed_bytes(est: Estimate) -> float:
    """What must fit on the device: the total, less the optimizer states a paged optimizer moves to the host."""
    return est.total_without_paged_states


def max_seq_len(model: str | ModelSizes, budget_bytes: float, step: int = MAX_SEQ_STEP, limit: int = MAX_SEQ_LIMIT,
                **plan) -> tuple[int, Estimate | None]:
    """The longest sequence, a multiple of `step` up to `limit`, whose estimate (`plan`: `estimate`'s other
    keyword arguments) needs at most `budget_bytes`, with that estimate (`model` as `estimate` takes it);
    (0, None) when `step` tokens do not fit.
    A bisection that keeps "lo fits, hi does not", so the answer fits and one step more does not."""
    sizes = model if isinstance(model, ModelSizes) else model_sizes(model, plan.get("target", "all-linear"))
    fits = {}

    def at(k: int) -> Estimate:
        if k not in fits:
            fits[k] = estimate(sizes, seq_len=k * step, **plan)
        return fits[k]

    lo, hi = 0, 1
    while hi * step <= limit and needed_bytes(at(hi)) <= budget_bytes:
        lo, hi = hi, hi * 2
    if hi * step > limit:
        hi = limit // step + 1  # past the limit: treated as not fitting
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if needed_bytes(at(mid)) <= budget_bytes else (lo, mid)
    return (lo * step, at(lo)) if lo else (0, None)


def format_count(n: float) -> str:
    """A parameter count for people: 6.74B, 170.3M, 98.3K, 512 (a tiny model is not "0.00B")."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{2 if suffix == 'B' else 1}f}{suffix}"
    return f"{int(n)}"


def format_table(est: Estimate, args_line: str) -> str:
    """The human-readable table `nf4tune estimate` prints."""
    gib = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB / 100 else f"{b / 2**20:8.2f} MiB"  # noqa: E731
    rows = [
        ("4-bit weights", est.weights_4bit, f"{format_count(est.quantized_parameters)} quantized parameters" + (
            f", {format_count(est.expert_parameters)} in experts ({est.experts} per layer, {est.experts_per_token} active)"
            if est.expert_parameters else "")),
        ("quantization constants", est.quant_constants, "absmax, double-quantized"),
        ("16-bit parts", est.weights_16bit, f"embeddings, norms, {'routers, ' if est.experts else ''}output head "
                                            f"({est.compute_dtype})"
         if est.quant_type != UNQUANTIZED else f"the whole base, unquantized ({est.compute_dtype})"),
        ("LoRA parameters", est.lora, f"{format_count(est.lora_parameters)} in float32" + (
            f", {format_count(est.expert_lora_parameters)} on experts (per expert)" if est.expert_lora_parameters else "")),
        ("gradients", est.gradients, "LoRA only, float32"),
        ("optimizer states", est.optimizer_states, "pageable to host memory" if est.optimizer_pageable
         else "on the GPU" if est.device == "cuda" else "in host memory"),
        ("activations", est.activations, f"with checkpointing {gib(est.activations_with_checkpointing).strip()}, "
                                         f"without {gib(est.activations_without_checkpointing).strip()}"),
        ("kept outputs", est.kept_outputs, "spare the recompute its matmuls, on CPU its attention "
                                           "(model.nf4tune.kept_outputs_gib)"),
        ("logits", est.logits, "chunked loss"),
    ]
    if est.device == "cuda":
        rows.append(("CUDA context, allocator", est.overhead, ""))
    lines = [f"# {args_line}", f"{'component':<26}{'memory':>13}   note"]
    lines += [f"{name:<26}{gib(b):>13}   {note}" for name, b, note in rows]
    lines.append(f"{'total':<26}{gib(est.total):>13}")
    if est.optimizer_pageable:
        lines.append(f"{'total, states paged out':<26}{gib(est.total_without_paged_states):>13}")
    fits = est.fits()
    if fits:
        lines.append("fits on: " + ", ".join(f"{gb} GB {'yes' if ok else 'no'}" for gb, ok in fits.items()))
    else:  # a CPU run: the process also holds Python and torch, which the table does not count
        lines.append("a CPU run: the process's peak resident set is this plus Python and torch themselves")
    return "\n".join(lines)


def pick_strategy(model: str, device_bytes: float, gpus: int, **plan) -> tuple[str, str]:
    """What `training.parallel: auto` picks for `gpus` devices of `device_bytes` each, and why in a few
    words: DDP when the whole run (paged optimizer states excluded) fits one device with headroom,
    else FSDP. `plan` are `estimate`'s keyword arguments (seq_len, batch, r, ...)."""
    ddp = estimate(model, gpus=gpus, strategy="ddp", **plan)
    need, room = ddp.total_without_paged_states, HEADROOM * device_bytes
    if need <= room:
        return "ddp", f"a replica needs {need / GIB:.2f} GiB, within {HEADROOM:.0%} of {device_bytes / GIB:.1f} GiB per device"
    fsdp = estimate(model, gpus=gpus, strategy="fsdp", **plan)
    return "fsdp", (f"a replica needs {need / GIB:.2f} GiB, over {HEADROOM:.0%} of {device_bytes / GIB:.1f} GiB per device; "
                    f"sharded over {gpus}: {fsdp.total_without_paged_states / GIB:.2f} GiB")
