"""The lists of choices users name: quantization types, block sizes, optimizers, model families and
what nf4tune does with each. One registry each.

Importing this module imports no torch, so the command line can offer these choices (and `--help`
answer) at once; what a name builds is imported only when it is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# The 4-bit types of nf4tune's core (quant/codes.py). int4 is an ablation: bitsandbytes has no such type, so
# only nf4 and fp4 can be written as bitsandbytes checkpoints.
QUANT_TYPES = ("nf4", "fp4", "int4")
BITSANDBYTES_QUANT_TYPES = ("nf4", "fp4")
# quant.quant_type (and load_model's quant_type) may also leave the base unquantized: its linear weights are
# kept in the compute dtype and get LoRA all the same (16-bit LoRA, QLoRA's baseline).
UNQUANTIZED = "none"
BASE_QUANT_TYPES = (*QUANT_TYPES, UNQUANTIZED)
# How several ranks (torchrun) share training: train/parallel.py. `auto` lets the planner choose.
PARALLEL_STRATEGIES = ("fsdp", "ddp")
# What `nf4tune estimate --device` sizes a run for: plan/estimate.py.
ESTIMATE_DEVICES = ("cuda", "cpu")
# model.compute_dtype: name -> bytes per element, what the planner sizes the unquantized weights and the
# activations with. "auto" (the recipe's default) is bfloat16, or float16 on GPUs without it: 2 bytes either way.
COMPUTE_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
AUTO_COMPUTE_DTYPE_BYTES = 2

# Elements per quantization block: powers of two, as bitsandbytes supports them.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# GGUF types `nf4tune export --type` writes: name -> (gguf tensor type, gguf file type)
EXPORT_TYPES = {
    "f16": ("F16", "MOSTLY_F16"),
    "f32": ("F32", "ALL_F32"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    # k-quants by nf4tune's ports of llama.cpp's quantizers (checkpoint/gguf_quants.py); "Q4_K_M" is not one
    # tensor type but llama.cpp's mix of Q4_K and Q6_K (gguf_quants.q4_k_m_type).
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q4_k_m": ("Q4_K_M", "MOSTLY_Q4_K_M"),
}
# Types llama.cpp has that nf4tune cannot make: named so the refusal can say what to do.
UNSUPPORTED_TYPES = {"q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q2_k": "Q2_K", "q3_k_m": "Q3_K_M"}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name: where its class lives and what its states cost.

    Args:
        target: "module:Class", imported when the optimizer is built.
        state_bytes: bytes of optimizer state per trainable parameter.
        pageable: whether the states can live in host memory between steps.
    """

    target: str
    state_bytes: float
    pageable: bool

    def build(self, param_groups, **kwargs):
        """The optimizer over `param_groups` (kwargs: lr, betas, eps, ...)."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(param_groups, **kwargs)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "paged_adamw_32bit": OptimizerSpec("nf4tune.optim.paged_adamw:PagedAdamW", 8.0, True),
    # two 8-bit moments + a float32 scale per 256
    "paged_adamw_8bit": OptimizerSpec("nf4tune.optim.paged_adamw:PagedAdamW8bit", 2 + 8 / 256, True),
    "adamw_torch": OptimizerSpec("torch.optim:AdamW", 8.0, False),
}


@dataclass(frozen=True)
class FamilySpec:
    """What nf4tune does with one transformers `model_type` (a family whose layer choice is tested).

    Args:
        chunked_loss: decoder-only with a linear output head: training computes the loss from the hidden
            states a chunk of tokens at a time (models/loss.py: the training loop, the labels forward).
        logits_divisor: the config field transformers divides the head's logits by (Granite's
            logits_scaling); the chunked loss divides them likewise.
        logits_softcap: the config field of the soft cap transformers puts on the logits, cap * tanh(logits /
            cap) (Gemma 2's final_logit_softcapping; a config that leaves it None has none); the chunked
            loss caps them likewise.
        decoder: nf4tune's own decoders serve it (serve/decoder.py, serve/static_decoder.py).
        gguf_arch: the llama.cpp architecture `nf4tune export` writes it as; None: not exported.
        gguf_permute_qk: whether Q/K rows are permuted into llama.cpp's rotary order on export.
        gguf_norm_shift: added to every RMSNorm weight on export (Gemma's norms scale by 1 + w, llama.cpp's
            by the stored weight, so its converter stores w + 1).
        gguf_tied_output: llama.cpp's graph for the arch reads the output head from the token embedding, so
            a model with a separate (untied) head cannot be exported.
        gguf_activation: the MLP activation (transformers' `hidden_act` name) llama.cpp's graph for the arch
            computes; a model with another is refused.
        gguf_refused_flags: config fields that must be off (false or absent): variants llama.cpp's graph for
            the arch does not have.
        gguf_required_fields: config fields that must be set (not None): what llama.cpp's graph for the arch
            always applies (Gemma 2's soft-capping), so a model without it cannot be exported.
        gguf_fused_qkv: its attention input projection is one fused matrix (llama.cpp's attn_qkv), which
            llama.cpp's Q4_K_M mix puts in Q5_K.
        gguf_rope_types: the rope scaling types (transformers' `rope_type`) the exporter writes for it: "linear"
            and "yarn" as rope.scaling metadata, "llama3" as the rope_freqs tensor only llama.cpp's llama graph
            reads, "longrope" as the rope_factors_long / _short tensors llama.cpp's phi3 graph reads; a model
            with another is refused.
    """

    chunked_loss: bool = False
    logits_divisor: str | None = None
    logits_softcap: str | None = None
    decoder: bool = False
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False
    gguf_norm_shift: float = 0.0
    gguf_tied_output: bool = False
    gguf_activation: str = "silu"
    gguf_refused_flags: tuple[str, ...] = ()
    gguf_required_fields: tuple[str, ...] = ()
    gguf_fused_qkv: bool = False
    gguf_rope_types: tuple[str, ...] = ("default",)


_LLAMA_LIKE = FamilySpec(chunked_loss=True, decoder=True, gguf_arch="llama", gguf_permute_qk=True,
                         gguf_rope_types=("default", "linear", "yarn", "llama3"))
_SCALED_ROPE = ("default", "linear", "yarn")
FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": FamilySpec(chunked_loss=True, decoder=True, gguf_arch="qwen2", gguf_rope_types=_SCALED_ROPE),
    # q_norm / k_norm map to attn_q_norm / attn_k_norm; llama.cpp's qwen3 has no q/k/v biases.
    "qwen3": FamilySpec(chunked_loss=True, gguf_arch="qwen3", gguf_rope_types=_SCALED_ROPE,
                        gguf_refused_flags=("attention_bias", "use_sliding_window")),
    "gemma": FamilySpec(chunked_loss=True, gguf_arch="gemma", gguf_norm_shift=1.0, gguf_tied_output=True,
                        gguf_activation="gelu_pytorch_tanh", gguf_refused_flags=("use_bidirectional_attention",)),
    # llama.cpp's gemma2 always soft-caps attention and output logits and reads the head from the embedding;
    # norms as Gemma's.
    "gemma2": FamilySpec(chunked_loss=True, logits_softcap="final_logit_softcapping",
                         gguf_arch="gemma2", gguf_norm_shift=1.0, gguf_tied_output=True,
                         gguf_activation="gelu_pytorch_tanh", gguf_refused_flags=("use_bidirectional_attention",),
                         gguf_required_fields=("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")),
    # Gemma 3's text model (q_norm / k_norm, local and global rope bases): llama.cpp's gemma3 has no attention
    # soft-capping; linear rope scaling only on the global layers (transformers' "full_attention" parameters).
    "gemma3_text": FamilySpec(chunked_loss=True, logits_softcap="final_logit_softcapping",
                              gguf_arch="gemma3", gguf_norm_shift=1.0, gguf_activation="gelu_pytorch_tanh",
                              gguf_refused_flags=("attn_logit_softcapping", "use_bidirectional_attention"),
                              gguf_rope_types=("default", "linear")),
    # fused qkv_proj / gate_up_proj map as they are to attn_qkv / ffn_up (twice intermediate_size wide).
    "phi3": FamilySpec(chunked_loss=True, gguf_arch="phi3", gguf_fused_qkv=True, gguf_rope_types=("default", "longrope")),
    "smollm3": FamilySpec(chunked_loss=True, gguf_arch="smollm3", gguf_permute_qk=True,
                          gguf_refused_flags=("use_sliding_window",)),
    "granite": FamilySpec(chunked_loss=True, logits_divisor="logits_scaling", gguf_arch="granite", gguf_permute_qk=True),
    # llama.cpp's olmo2 requires a separate output head.
    "olmo2": FamilySpec(chunked_loss=True, gguf_arch="olmo2", gguf_refused_flags=("tie_word_embeddings",)),
    "t5": FamilySpec(),
    "mt5": FamilySpec(),
}

# Decoder-only families whose long sequences train with nf4tune's long-context layers (models/load.py): attention
# through transformers' AttentionInterface as `nf4tune_chunked` (layers/chunked_attention.py), and a token-wise
# `mlp` module per layer, tiled over tokens (layers/tiled_mlp.py).
LONG_CONTEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3",
                         "granite", "olmo2")


def families(capability: str) -> tuple[str, ...]:
    """The model types with `capability` (a FamilySpec field) set, e.g. families("decoder")."""
    return tuple(name for name, spec in FAMILIES.items() if getattr(spec, capability))
