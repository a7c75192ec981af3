"""What the GGUF exporter knows of each llama.cpp architecture: the models llama.cpp could not run as exported
(refused from the config alone, before anything loads), rope scaling as llama.cpp's keys and tensors, the metadata
one architecture reads beyond the common keys, and ExportPlan, which names, lays out and describes one model's
tensors for llama.cpp."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import Nf4tuneError
from ..registry import EXPORT_TYPES, FAMILIES, FamilySpec, families
from .architecture import to_config
from .gguf import require_gguf

EXPORT_FAMILIES = families("gguf_arch")


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection in llama.cpp's rotary order (interleaved pairs), as its
    convert_hf_to_gguf.py writes them; transformers' GGUF loader undoes exactly this."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _refusal(model_type: str, config: dict) -> str | None:
    """Why llama.cpp cannot run this model as exported (one sentence), or None. Read from the config as
    transformers builds it (its defaults filled in, legacy values such as Gemma's hidden_act "gelu" corrected)."""
    spec, cfg = FAMILIES[model_type], to_config(config)
    rope_type = _rope_type(cfg)
    if rope_type not in spec.gguf_rope_types:
        return f"the model uses {rope_type!r} rope scaling, which the GGUF exporter does not write yet."
    rope = _rope_parameters(cfg.rope_parameters)
    yarn_extras = [k for k in _YARN_UNWRITTEN if rope.get(k) is not None] if rope_type == "yarn" else []
    if yarn_extras:
        return (f"the model's yarn rope scaling sets {', '.join(yarn_extras)}, which llama.cpp computes differently, "
                "so it cannot be exported.")
    if spec.gguf_tied_output and not cfg.tie_word_embeddings:
        return (f"llama.cpp's {spec.gguf_arch} models take the output head from the token embedding, so a {model_type} "
                "model with a separate (untied) lm_head cannot be exported.")
    if _activation(cfg) != spec.gguf_activation:
        return (f"llama.cpp's {spec.gguf_arch} models compute {spec.gguf_activation}, but this model's activation is "
                f"{_activation(cfg)!r}, so it cannot be exported.")
    flags = [flag for flag in spec.gguf_refused_flags if getattr(cfg, flag, None)]
    if flags:
        return (f"the model sets {', '.join(flags)}, which llama.cpp's {spec.gguf_arch} models do not have, so it "
                "cannot be exported.")
    unset = [name for name in spec.gguf_required_fields if getattr(cfg, name, None) is None]
    if unset:
        return (f"llama.cpp's {spec.gguf_arch} models always apply {', '.join(unset)}, which this model leaves unset, "
                "so it cannot be exported.")
    off = [name for name in spec.gguf_required_flags if not getattr(cfg, name, None)]
    if off:
        return (f"llama.cpp's {spec.gguf_arch} models always apply {', '.join(off)}, which this model turns off, so it "
                "cannot be exported.")
    arch_refusal = _ARCH_REFUSALS.get(spec.gguf_arch)
    return arch_refusal(cfg, spec.gguf_arch) if arch_refusal else None


def _activation(cfg) -> str:
    """The MLP activation's transformers name: Gemma 2 and 3 call the field hidden_activation, the others hidden_act."""
    return getattr(cfg, "hidden_activation", None) or cfg.hidden_act


# The layer count by which llama.cpp recognises the 27B Gemma, whose queries it scales by 1/sqrt(hidden / heads)
# rather than by 1/sqrt(head_dim) (the two differ there).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_refusal(cfg, arch: str) -> str | None:
    # llama.cpp has no key for the query scale: it derives it from the shape, where transformers reads
    # query_pre_attn_scalar (every released Gemma 2 / 3 agrees with llama.cpp's rule).
    scalar = cfg.hidden_size / cfg.num_attention_heads if cfg.num_hidden_layers == _GEMMA_27B_LAYERS[arch] else cfg.head_dim
    if not math.isclose(cfg.query_pre_attn_scalar, scalar):
        return (f"the model scales queries by query_pre_attn_scalar {cfg.query_pre_attn_scalar}, but llama.cpp's {arch} "
                f"models use {scalar:g} for this shape, so it cannot be exported.")
    sliding = (cfg.rope_parameters or {}).get("sliding_attention") or {}
    if (sliding.get("rope_type") or "default") != "default":
        return (f"the model scales the rotary embeddings of its sliding-window layers ({sliding['rope_type']!r}), which "
                f"llama.cpp's {arch} models do not, so it cannot be exported.")
    return None


def _smollm3_refusal(cfg, arch: str) -> str | None:
    # llama.cpp's smollm3 skips rotary embeddings on every 4th layer, fixed; transformers reads no_rope_layers
    # (1: rotary, 0: none), which SmolLM3's config fills in the same way by default.
    llama_cpp = [int((i + 1) % 4 != 0) for i in range(cfg.num_hidden_layers)]
    if list(cfg.no_rope_layers) != llama_cpp:
        return (f"llama.cpp's {arch} models leave out rotary embeddings on every 4th layer exactly, but this model's "
                f"no_rope_layers are {list(cfg.no_rope_layers)}, so it cannot be exported.")
    return None


def _olmo2_refusal(cfg, arch: str) -> str | None:
    # llama.cpp's olmo2 sizes its attention heads as hidden_size / num_attention_heads, with no key for another
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        return (f"the model's head_dim {head_dim} is not hidden_size / num_attention_heads, which llama.cpp's {arch} "
                "models assume, so it cannot be exported.")
    return None


def _olmoe_refusal(cfg, arch: str) -> str | None:
    # llama.cpp's olmoe sizes its k_norm as the whole hidden size: keys as many heads as queries, with no key for fewer
    if (cfg.num_key_value_heads or cfg.num_attention_heads) != cfg.num_attention_heads:
        return (f"the model has {cfg.num_key_value_heads} key/value heads for {cfg.num_attention_heads} query heads "
                f"(grouped-query attention), which llama.cpp's {arch} models do not have, so it cannot be exported.")
    return _olmo2_refusal(cfg, arch)


def _sparse_step_refusal(cfg, arch: str) -> str | None:
    # llama.cpp's qwen2moe / qwen3moe give every layer experts; transformers makes only every decoder_sparse_step-th
    # layer sparse (the others dense MLPs, as mlp_only_layers does, refused from the registry)
    step = getattr(cfg, "decoder_sparse_step", 1)
    if step != 1:
        return (f"the model has experts on every {step}th layer only (decoder_sparse_step), but llama.cpp's {arch} models "
                "have them on every layer, so it cannot be exported.")
    return None


# Refusals one llama.cpp architecture needs beyond the FamilySpec's declared ones: what its graph computes from
# the shape or fixes, where transformers reads a config field.
_ARCH_REFUSALS = {"gemma2": _gemma_refusal, "gemma3": _gemma_refusal, "smollm3": _smollm3_refusal,
                  "olmo2": _olmo2_refusal, "olmoe": _olmoe_refusal,
                  "qwen2moe": _sparse_step_refusal, "qwen3moe": _sparse_step_refusal}


# YaRN settings transformers and llama.cpp agree on only at their defaults: llama.cpp always scales attention by
# 1 + 0.1 ln(factor) (times its attn_factor) and always rounds the correction range outwards (truncate).
_YARN_UNWRITTEN = ("attention_factor", "mscale", "mscale_all_dim", "truncate")


def _rope_parameters(rope: dict | None) -> dict:
    """The rope parameters of the global (full-attention) layers: Gemma 3 keeps one set per layer type, and llama.cpp's
    converter takes the rope base and scaling from "full_attention" (the local layers' base goes in its own key)."""
    rope = rope or {}
    return rope.get("full_attention", rope)


def _rope_type(cfg) -> str:
    """transformers' rope type of a config object (its rope_parameters standardized from a legacy rope_scaling)."""
    rope = _rope_parameters(cfg.rope_parameters)
    return rope.get("rope_type", rope.get("type")) or "default"


def llama3_rope_factors(config: dict) -> torch.Tensor:
    """The per-frequency divisors of Llama 3 rope scaling as llama.cpp's rope_freqs tensor holds them (float32,
    head_dim / 2): the default inverse frequencies over transformers' Llama 3 ones, so the factors are the ones
    transformers computes (llama.cpp divides each rotary frequency by its factor)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = to_config(config)
    scaled, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    if attention_factor != 1.0:  # llama.cpp's rope_freqs carries no attention scale
        raise Nf4tuneError(f"the model's llama3 rope scaling has an attention factor of {attention_factor}, which "
                           "llama.cpp's rope_freqs cannot carry, so it cannot be exported.")
    # The unscaled inverse frequencies, computed as transformers' _compute_llama3_parameters computes them
    # before scaling (so the ratio is exactly the scaling).
    rope = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default.double() / scaled.double()).float()


def _rope_scaling_metadata(writer, config: dict) -> None:
    # As llama.cpp's converter: linear and yarn scaling as metadata (llama.cpp's freq_scale = 1 / factor; yarn's
    # ramp between the pre-extension context's correction dimensions, beta_fast / beta_slow where set, else
    # llama.cpp's defaults 32 / 1, transformers' too); llama3's scaling goes in the rope_freqs tensor
    # (ExportPlan.extra_tensors) and needs no key.
    gguf = require_gguf()
    cfg = to_config(config)
    rope, rope_type = _rope_parameters(cfg.rope_parameters), _rope_type(cfg)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":  # no factor: transformers takes the context's growth (DeepSeek-V3's configs)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope.get("factor") or cfg.max_position_embeddings
                                             / rope["original_max_position_embeddings"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("beta_fast"):
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow"):
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))


def _phi3_metadata(writer, config: dict) -> None:
    # As llama.cpp's converter: the pre-extension context, and a sliding window of 0 unless set (llama.cpp's phi3
    # graph ignores it either way). With longrope, the attention factor transformers scales cos / sin by (its
    # default sqrt(1 + ln(scale) / ln(original context)), as the converter computes it); llama.cpp takes the long
    # factors when its context exceeds the original one, transformers when the sequence does.
    cfg = to_config(config)
    rope = cfg.rope_parameters or {}
    writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings")
                                         or config.get("original_max_position_embeddings")
                                         or config.get("max_position_embeddings", 4096))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if _rope_type(cfg) == "longrope":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")
        writer.add_rope_scaling_attn_factors(float(attention_factor))


def _sliding_window_metadata(writer, cfg, always: bool) -> None:
    # Which layers attend within the window, per layer (transformers' layer_types), rather than llama.cpp's own
    # default pattern for the arch; with no sliding layer, no window (Gemma 3: llama.cpp then attends fully).
    sliding = [kind == "sliding_attention" for kind in (getattr(cfg, "layer_types", None) or [])]
    if always or any(sliding):
        writer.add_sliding_window(int(cfg.sliding_window))
        writer.add_sliding_window_pattern(sliding or [False] * cfg.num_hidden_layers)


def _gemma2_metadata(writer, config: dict) -> None:
    # As llama.cpp's converter: both soft-caps and the window (its gemma2 graph applies them always: _refusal
    # checked they are set), and the local layers by transformers' layer_types.
    cfg = to_config(config)
    writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    _sliding_window_metadata(writer, cfg, always=True)


def _gemma3_metadata(writer, config: dict) -> None:
    # As llama.cpp's converter: the local layers' rope base in its own key (the global one is the common
    # rope.freq_base), the output soft-cap when set, the window and which layers use it.
    cfg = to_config(config)
    sliding_rope = (cfg.rope_parameters or {}).get("sliding_attention")
    if sliding_rope and sliding_rope.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding_rope["rope_theta"]))
    if cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if cfg.sliding_window:
        _sliding_window_metadata(writer, cfg, always=False)


def _granite_metadata(writer, config: dict) -> None:
    # transformers' multipliers under llama.cpp's names, written always: llama.cpp requires logit_scale (it divides
    # the logits by it, as transformers divides by logits_scaling), and an attention scale left out would mean
    # 1/sqrt(head_dim) there where transformers scales by attention_multiplier.
    cfg = to_config(config)
    writer.add_embedding_scale(float(cfg.embedding_multiplier))
    writer.add_residual_scale(float(cfg.residual_multiplier))
    writer.add_attention_scale(float(cfg.attention_multiplier))
    writer.add_logit_scale(float(cfg.logits_scaling))


# Metadata one llama.cpp architecture reads beyond the common keys (ExportPlan.add_metadata).
_ARCH_METADATA = {"phi3": _phi3_metadata, "gemma2": _gemma2_metadata, "gemma3": _gemma3_metadata,
                  "granite": _granite_metadata}


@dataclass
class ExportPlan:
    """What to write: the llama.cpp architecture, metadata from the config, and how to name and lay out tensors."""

    arch: str
    spec: FamilySpec
    config: dict
    name_map: object

    @classmethod
    def for_config(cls, config: dict) -> "ExportPlan":
        gguf = require_gguf()
        model_type = config.get("model_type")
        if model_type not in EXPORT_FAMILIES:
            raise Nf4tuneError(f"exporting {model_type!r} models to GGUF is not supported yet; supported families: "
                               f"{', '.join(EXPORT_FAMILIES)}.")
        refusal = _refusal(model_type, config)
        if refusal:
            raise Nf4tuneError(refusal)
        spec = FAMILIES[model_type]
        arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[spec.gguf_arch]
        return cls(spec.gguf_arch, spec, config, gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"]))

    @property
    def has_output(self) -> bool:
        """Whether the file holds a separate output.weight (else llama.cpp uses token_embd as the head)."""
        return not (self.config.get("tie_word_embeddings") or self.spec.gguf_tied_output)

    @property
    def n_experts(self) -> int:
        """Routed experts per layer of a mixture-of-experts family (FamilySpec.gguf_expert_count), else 0."""
        field = self.spec.gguf_expert_count
        return int(getattr(to_config(self.config), field)) if field else 0

    def named_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(llama.cpp's name, tensor) of each of `tensors` (transformers keys, in checkpoint order) llama.cpp stores:
        a mixture-of-experts layer's experts stacked into one tensor per projection first (gguf_experts.py)."""
        if self.n_experts:
            from .gguf_experts import stack_experts

            tensors = stack_experts(tensors, self.n_experts)
        for key, w in tensors:
            name = self.gguf_name(key)
            if name is not None:
                yield name, w

    def gguf_name(self, key: str) -> str | None:
        """llama.cpp's name for a transformers key, or None for a tensor llama.cpp does not store."""
        if key == "lm_head.weight" and not self.has_output:
            return None
        name, _, suffix = key.rpartition(".")
        mapped = self.name_map.get_name(name)
        return None if mapped is None else f"{mapped}.{suffix}"

    def layout(self, gguf_name: str, w: torch.Tensor) -> torch.Tensor:
        """`w` as llama.cpp's converter writes it: Q/K rows in its rotary order where the family needs it, RMSNorm
        weights shifted where the family's norm scales by (shift + w)."""
        if self.spec.gguf_permute_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            heads = self.config["num_attention_heads"]
            if ".attn_k." in gguf_name:
                heads = self.config.get("num_key_value_heads") or heads
            return permute_for_llama_cpp(w, heads)
        if self.spec.gguf_norm_shift and gguf_name.endswith("norm.weight"):
            return w.float() + self.spec.gguf_norm_shift
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):  # the shared expert's gate [1, H]: llama.cpp's is 1-D
            return w.reshape(-1)
        return w

    def extra_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors llama.cpp needs that the checkpoint does not hold: rope_freqs for Llama 3 rope scaling, Phi-3's
        longrope factors."""
        cfg = to_config(self.config)
        gguf = require_gguf()
        names = gguf.TENSOR_NAMES
        if _rope_type(cfg) == "llama3":
            return [(names[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(self.config))]
        if _rope_type(cfg) == "longrope":  # transformers checked that each holds one factor per rotary frequency
            return [(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", torch.tensor(cfg.rope_parameters["long_factor"])),
                    (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", torch.tensor(cfg.rope_parameters["short_factor"]))]
        return []

    def _add_expert_metadata(self, writer) -> None:
        # As llama.cpp's converter: the routed experts and how many each token uses; each expert's intermediate size
        # and the shared expert's where the family has their own fields (else llama.cpp takes feed_forward_length).
        cfg, spec = to_config(self.config), self.spec
        writer.add_expert_count(self.n_experts)
        writer.add_expert_used_count(int(cfg.num_experts_per_tok))
        if spec.gguf_expert_ffn:
            writer.add_expert_feed_forward_length(int(getattr(cfg, spec.gguf_expert_ffn)))
        if spec.gguf_shared_expert_ffn:
            writer.add_expert_shared_feed_forward_length(int(getattr(cfg, spec.gguf_shared_expert_ffn)))

    def add_metadata(self, writer, name: str, kind: str) -> None:
        gguf = require_gguf()
        c = self.config
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        rope = _rope_parameters(c.get("rope_parameters"))
        rotary_fraction = rope.get("partial_rotary_factor", c.get("partial_rotary_factor")) or 1.0
        writer.add_name(name)
        writer.add_context_length(c.get("max_position_embeddings", 2048))
        writer.add_embedding_length(c["hidden_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(c.get("num_key_value_heads") or heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        writer.add_rope_dimension_count(int(head_dim * rotary_fraction))
        # As llama.cpp's converter, whenever the config states a head_dim (transformers' GGUF reader needs it for Gemma
        # 2 / 3 even where it is hidden_size / heads), and where it differs from that
        if c.get("head_dim") or head_dim != c["hidden_size"] // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        _rope_scaling_metadata(writer, c)
        if self.n_experts:
            self._add_expert_metadata(writer)
        if self.arch in _ARCH_METADATA:
            _ARCH_METADATA[self.arch](writer, c)
        writer.add_vocab_size(c["vocab_size"])
        writer.add_file_type(getattr(gguf.LlamaFileType, EXPORT_TYPES[kind][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
