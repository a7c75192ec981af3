"""The lists of choices users name: quantization types, block sizes, optimizers, model families and
what nf4tune does with each. One registry each.

Importing this module imports no torch, so the command line can offer these choices (and `--help`
answer) at once; what a name builds is imported only when it is built.
"""

from __future__ import annotations

import dataclasses
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
        decoder: nf4tune's own decoding step serves it (runtime/step.py: serve/decoder.py,
            serve/static_decoder.py, evaluate/packed.py); the fields below say how its layers differ.
        norm_offset: its RMSNorms scale by (norm_offset + w) (Gemma's 1 + w).
        sandwich_norms: its layers normalize the attention and MLP outputs too (Gemma 2 / 3's
            post_attention_layernorm on the attention output, pre_ / post_feedforward_layernorm around the MLP).
        qk_norm: per-head RMSNorms on the queries and keys before rotary (Qwen3, Gemma 3's q_norm / k_norm).
        fused_projections: one qkv_proj and one gate_up_proj (Phi-3) instead of q/k/v and gate/up.
        sliding_window: config.sliding_window applies to every layer where the config has no layer_types
            (Mistral, Phi-3); with layer_types, their "sliding_attention" layers slide.
        attention_softcap: the config field of the soft cap on attention scores (Gemma 2's attn_logit_softcapping).
        rope_per_layer_type: its rotary embedding has one base per layer type (Gemma 3's local / global).
        rope_layers: the config field listing, per layer, whether it applies rotary (SmolLM3's no_rope_layers).
        embedding_multiplier / residual_multiplier: config fields scaling the embeddings and each layer's
            outputs (Granite).
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
        gguf_required_flags: config fields that must be on (true): what llama.cpp's graph for the arch always does
            (Qwen3-MoE's renormalized top-k expert weights, norm_topk_prob).
        gguf_expert_count: the config field holding a mixture-of-experts model's number of routed experts; set,
            the exporter stacks each layer's experts into llama.cpp's 3-D ffn_{gate,up,down}_exps tensors and
            writes expert_count and expert_used_count (num_experts_per_tok).
        gguf_expert_ffn: the config field of one routed expert's intermediate size, written as
            expert_feed_forward_length (None: llama.cpp's graph takes feed_forward_length).
        gguf_shared_expert_ffn: the config field of the shared expert's intermediate size, written as
            expert_shared_feed_forward_length (Qwen2-MoE's shared expert).
        gguf_fused_qkv: its attention input projection is one fused matrix (llama.cpp's attn_qkv), which
            llama.cpp's Q4_K_M mix puts in Q5_K.
        gguf_rope_types: the rope scaling types (transformers' `rope_type`) the exporter writes for it: "linear"
            and "yarn" as rope.scaling metadata, "llama3" as the rope_freqs tensor only llama.cpp's llama graph
            reads, "longrope" as the rope_factors_long / _short tensors llama.cpp's phi3 graph reads; a model
            with another is refused.
        moe_experts: a mixture of experts whose experts are a transformers experts module (fused 3-D
            parameters): they are held in 4-bit and get per-expert LoRA (layers/experts4bit.py). Their
            checkpoints' per-expert keys are fused by transformers' own conversion mapping, so no table here.
        long_context: a decoder-only family whose long sequences train with nf4tune's long-context layers
            (models/load.py): attention through transformers' AttentionInterface as `nf4tune_chunked`
            (layers/chunked_attention.py), and a token-wise `mlp` module per layer, tiled over tokens
            (layers/tiled_mlp.py).
    """

    chunked_loss: bool = False
    logits_divisor: str | None = None
    logits_softcap: str | None = None
    decoder: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    qk_norm: bool = False
    fused_projections: bool = False
    sliding_window: bool = False
    attention_softcap: str | None = None
    rope_per_layer_type: bool = False
    rope_layers: str | None = None
    embedding_multiplier: str | None = None
    residual_multiplier: str | None = None
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False
    gguf_norm_shift: float = 0.0
    gguf_tied_output: bool = False
    gguf_activation: str = "silu"
    gguf_refused_flags: tuple[str, ...] = ()
    gguf_required_fields: tuple[str, ...] = ()
    gguf_required_flags: tuple[str, ...] = ()
    gguf_expert_count: str | None = None
    gguf_expert_ffn: str | None = None
    gguf_shared_expert_ffn: str | None = None
    gguf_fused_qkv: bool = False
    gguf_rope_types: tuple[str, ...] = ("default",)
    moe_experts: bool = False
    long_context: bool = False


_LLAMA_LIKE = FamilySpec(long_context=True, chunked_loss=True, decoder=True, gguf_arch="llama", gguf_permute_qk=True,
                         gguf_rope_types=("default", "linear", "yarn", "llama3"))
_SCALED_ROPE = ("default", "linear", "yarn")
FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": dataclasses.replace(_LLAMA_LIKE, sliding_window=True),
    "qwen2": FamilySpec(long_context=True, chunked_loss=True, decoder=True, gguf_arch="qwen2",
                        gguf_rope_types=_SCALED_ROPE),
    # q_norm / k_norm map to attn_q_norm / attn_k_norm; llama.cpp's qwen3 has no q/k/v biases.
    "qwen3": FamilySpec(long_context=True, chunked_loss=True, decoder=True, qk_norm=True, gguf_arch="qwen3",
                        gguf_rope_types=_SCALED_ROPE,
                        gguf_refused_flags=("attention_bias", "use_sliding_window")),
    "gemma": FamilySpec(long_context=True, chunked_loss=True, decoder=True, norm_offset=1.0, gguf_arch="gemma",
                        gguf_norm_shift=1.0, gguf_tied_output=True,
                        gguf_activation="gelu_pytorch_tanh", gguf_refused_flags=("use_bidirectional_attention",)),
    # llama.cpp's gemma2 always soft-caps attention and output logits and reads the head from the embedding;
    # norms as Gemma's.
    "gemma2": FamilySpec(long_context=True, chunked_loss=True, logits_softcap="final_logit_softcapping", decoder=True,
                         norm_offset=1.0, sandwich_norms=True, attention_softcap="attn_logit_softcapping",
                         gguf_arch="gemma2", gguf_norm_shift=1.0, gguf_tied_output=True,
                         gguf_activation="gelu_pytorch_tanh", gguf_refused_flags=("use_bidirectional_attention",),
                         gguf_required_fields=("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")),
    # Gemma 3's text model (q_norm / k_norm, local and global rope bases): llama.cpp's gemma3 has no attention
    # soft-capping; linear rope scaling only on the global layers (transformers' "full_attention" parameters).
    "gemma3_text": FamilySpec(long_context=True, chunked_loss=True, logits_softcap="final_logit_softcapping",
                              decoder=True,
                              norm_offset=1.0, sandwich_norms=True, qk_norm=True, rope_per_layer_type=True,
                              attention_softcap="attn_logit_softcapping",
                              gguf_arch="gemma3", gguf_norm_shift=1.0, gguf_activation="gelu_pytorch_tanh",
                              gguf_refused_flags=("attn_logit_softcapping", "use_bidirectional_attention"),
                              gguf_rope_types=("default", "linear")),
    # fused qkv_proj / gate_up_proj map as they are to attn_qkv / ffn_up (twice intermediate_size wide).
    "phi3": FamilySpec(long_context=True, chunked_loss=True, decoder=True, fused_projections=True, sliding_window=True,
                       gguf_arch="phi3", gguf_fused_qkv=True, gguf_rope_types=("default", "longrope")),
    "smollm3": FamilySpec(long_context=True, chunked_loss=True, decoder=True, rope_layers="no_rope_layers",
                          gguf_arch="smollm3", gguf_permute_qk=True,
                          gguf_refused_flags=("use_sliding_window",)),
    "granite": FamilySpec(long_context=True, chunked_loss=True, logits_divisor="logits_scaling", decoder=True,
                          embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                          gguf_arch="granite", gguf_permute_qk=True),
    # llama.cpp's olmo2 requires a separate output head.
    "olmo2": FamilySpec(long_context=True, chunked_loss=True, gguf_arch="olmo2", gguf_refused_flags=("tie_word_embeddings",)),
    # Mixtures of experts (transformers' experts modules, experts in 4-bit: layers/experts4bit.py). llama.cpp's
    # graphs fix what transformers reads from the config: whether the chosen experts' weights are renormalized
    # (norm_topk_prob: always in qwen3moe and Mixtral's llama, never in qwen2moe and olmoe), every layer sparse
    # (mlp_only_layers empty; decoder_sparse_step 1, checked in gguf_arch).
    "qwen3_moe": FamilySpec(chunked_loss=True, moe_experts=True,
                            gguf_arch="qwen3moe", gguf_rope_types=_SCALED_ROPE, gguf_expert_count="num_experts",
                            gguf_expert_ffn="moe_intermediate_size", gguf_required_flags=("norm_topk_prob",),
                            gguf_refused_flags=("attention_bias", "use_sliding_window", "mlp_only_layers")),
    # llama.cpp's converter writes Mixtral as llama with expert tensors (Q/K rows permuted as Llama's)
    "mixtral": FamilySpec(chunked_loss=True, moe_experts=True,
                          gguf_arch="llama", gguf_permute_qk=True, gguf_rope_types=_SCALED_ROPE,
                          gguf_expert_count="num_local_experts"),
    # q_norm / k_norm over the whole projection, as OLMo 2's; llama.cpp's olmoe requires a separate output head.
    "olmoe": FamilySpec(chunked_loss=True, moe_experts=True,
                        gguf_arch="olmoe", gguf_expert_count="num_experts",
                        gguf_refused_flags=("norm_topk_prob", "attention_bias", "clip_qkv", "tie_word_embeddings")),
    # the shared expert and its sigmoid gate map to ffn_{gate,up,down}_shexp and ffn_gate_inp_shexp
    "qwen2_moe": FamilySpec(chunked_loss=True, moe_experts=True,
                            gguf_arch="qwen2moe", gguf_rope_types=_SCALED_ROPE, gguf_expert_count="num_experts",
                            gguf_expert_ffn="moe_intermediate_size", gguf_shared_expert_ffn="shared_expert_intermediate_size",
                            gguf_refused_flags=("norm_topk_prob", "use_sliding_window", "mlp_only_layers",
                                                "tie_word_embeddings")),
    # experts fused and transposed, with biases; not exported (llama.cpp's gpt-oss needs MXFP4 experts).
    "gpt_oss": FamilySpec(chunked_loss=True, moe_experts=True),
    "t5": FamilySpec(),
    "mt5": FamilySpec(),
}


def families(capability: str) -> tuple[str, ...]:
    """The model types with `capability` (a FamilySpec field) set, e.g. families("decoder")."""
    return tuple(name for name, spec in FAMILIES.items() if getattr(spec, capability))


LONG_CONTEXT_FAMILIES = families("long_context")
