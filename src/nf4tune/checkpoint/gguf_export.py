"""Writing GGUF files that llama.cpp loads: its tensor names and layout, model metadata, the tokenizer
and chat template, tensor types made by the `gguf` package's own quantizers; and LoRA adapters alone, as
llama.cpp's adapter GGUF files.

The file is written to a temporary name beside the output (tensor data spooled to an unnamed
temporary file as each tensor arrives, so no more than one tensor is in memory) and renamed into
place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Nf4tuneError
from .architecture import to_config
from .gguf import require_gguf

log = logging.getLogger("nf4tune")

# --type choices: (ggml type of 2-D weights, llama.cpp file type). One registry.
from ..registry import EXPORT_TYPES, FAMILIES, UNSUPPORTED_TYPES, FamilySpec, families  # noqa: E402, F401  (re-exported)

EXPORT_FAMILIES = families("gguf_arch")


def check_export_type(kind: str) -> None:
    """Refuse a --type the exporter cannot write, with a sentence saying what to do instead."""
    if kind in EXPORT_TYPES:
        return
    if kind in UNSUPPORTED_TYPES:
        raise Nf4tuneError(
            f"--type {kind} is not supported: nf4tune has no {UNSUPPORTED_TYPES[kind]} quantizer; export "
            f"--type f16 and run llama.cpp's `llama-quantize OUT.gguf OUT-{kind}.gguf {UNSUPPORTED_TYPES[kind]}`.")
    raise Nf4tuneError(f"unknown --type {kind!r}; supported: {', '.join(EXPORT_TYPES)}.")


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


# Refusals one llama.cpp architecture needs beyond the FamilySpec's declared ones: what its graph computes from
# the shape or fixes, where transformers reads a config field.
_ARCH_REFUSALS = {"gemma2": _gemma_refusal, "gemma3": _gemma_refusal, "smollm3": _smollm3_refusal,
                  "olmo2": _olmo2_refusal}


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
        if self.arch in _ARCH_METADATA:
            _ARCH_METADATA[self.arch](writer, c)
        writer.add_vocab_size(c["vocab_size"])
        writer.add_file_type(getattr(gguf.LlamaFileType, EXPORT_TYPES[kind][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_type(gguf_name: str, w: torch.Tensor, kind: str, n_layers: int, has_output: bool) -> str:
    """The ggml type of one tensor for --type `kind`: 1-D tensors F32 (llama.cpp keeps norms and biases so),
    Q4_K_M's per-tensor mix (gguf_quants.q4_k_m_type), else `kind`'s type; a k-quant whose rows do not fill
    256-weight super-blocks falls back as llama.cpp's does (Q6_K -> Q8_0)."""
    from .gguf_quants import QK_K, q4_k_m_type

    if w.dim() < 2:
        return "F32"
    qtype = EXPORT_TYPES[kind][0]
    if qtype == "Q4_K_M":
        return q4_k_m_type(gguf_name, n_layers, w.shape[-1], has_output)
    if qtype == "Q6_K" and w.shape[-1] % QK_K:
        return "Q8_0"
    return qtype


def to_gguf_array(gguf_name: str, w: torch.Tensor, qtype: str):
    """(numpy array, ggml type or None) for one tensor in ggml type `qtype` (see `tensor_type`); a weight whose
    rows do not fill whole quantization blocks stays float16."""
    gguf = require_gguf()
    from .gguf_quants import quantize

    w = w.detach().to(torch.float32).contiguous()
    if qtype == "F32":
        return w.numpy(), None
    if qtype == "F16":
        return w.to(torch.float16).numpy(), None
    ggml_type = getattr(gguf.GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    if w.shape[-1] % block:
        log.warning("nf4tune: %s has rows of %d, not a multiple of %d; written as F16.", gguf_name, w.shape[-1], block)
        return w.to(torch.float16).numpy(), None
    return quantize(w.numpy(), qtype), ggml_type


def padded_vocabulary(tokens: list, scores: list | None, types: list, n_vocab: int) -> tuple[list, list | None, list]:
    """(tokens, scores, types) grown to `n_vocab` entries as llama.cpp's converter grows them: an unused "[PAD{id}]"
    token for each embedding row no token names (Qwen2.5 and Qwen3 round their embeddings up well past their
    tokenizers), so llama.cpp, which sizes token_embd by the vocabulary, accepts the file. A vocabulary larger than
    the embedding is refused."""
    gguf = require_gguf()
    if len(tokens) > n_vocab:
        raise Nf4tuneError(f"the tokenizer has {len(tokens)} tokens but the model's embedding has {n_vocab} rows, so "
                           "llama.cpp cannot run it; export with the tokenizer the model was trained with.")
    pad = range(len(tokens), n_vocab)
    tokens = list(tokens) + [f"[PAD{i}]" for i in pad]
    types = list(types) + [int(gguf.TokenType.UNUSED)] * len(pad)
    if scores is not None:  # SentencePiece-style vocabularies: the score llama.cpp's converter gives its pads
        scores = list(scores) + [-1000.0] * len(pad)
    return tokens, scores, types


_VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def copy_tokenizer_fields(writer, source_gguf: Path, n_vocab: int) -> None:
    """The source GGUF's tokenizer.* metadata (vocabulary, merges, pre-tokenizer, special ids, chat template) as
    they are, the vocabulary padded to `n_vocab` (the embedding of a model whose adapter added rows)."""
    gguf = require_gguf()
    from .gguf import reader

    fields = reader(source_gguf).fields
    for key, fld in fields.items():
        if not key.startswith("tokenizer.") or key in _VOCABULARY_KEYS:
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, fld.contents(), vtype, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, fld.contents(), vtype)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in fields else None
    types = (fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields
             else [int(gguf.TokenType.NORMAL)] * len(tokens))
    tokens, scores, types = padded_vocabulary(tokens, scores, types, n_vocab)
    _add_vocabulary(writer, tokens, scores, types)


def _add_vocabulary(writer, tokens: list, scores: list | None, types: list) -> None:
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)


def add_hf_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """A transformers fast tokenizer as llama.cpp's vocabulary, padded to `n_vocab` tokens (the embedding's rows):
    byte-level BPE ("gpt2", with merges) or BPE with byte fallback ("llama", SentencePiece-style scores), special
    and added tokens, chat template."""
    require_gguf()  # one sentence on how to install gguf when it is missing
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tj = Path(tmp) / "tokenizer.json"
        model = json.loads(tj.read_text())["model"] if tj.is_file() else {}
        if model.get("type") != "BPE":
            raise Nf4tuneError(f"the tokenizer is a {model.get('type') or 'slow'} tokenizer; GGUF holds BPE or SentencePiece "
                               "vocabularies, so it cannot be written for llama.cpp.")
        byte_fallback = bool(model.get("byte_fallback"))
        vocab = LlamaHfVocab(Path(tmp)) if byte_fallback else BpeVocab(Path(tmp))
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        tokens, scores, types = padded_vocabulary(tokens, scores if byte_fallback else None, types, n_vocab)
        writer.add_tokenizer_model("llama" if byte_fallback else "gpt2")
        writer.add_tokenizer_pre("default" if byte_fallback else _pre_tokenizer(json.loads(tj.read_text())))
        _add_vocabulary(writer, tokens, scores, types)
        if byte_fallback and not _adds_space_prefix(json.loads(tj.read_text())):
            writer.add_add_space_prefix(False)  # llama.cpp's SentencePiece default is a "▁" in front (Gemma has none)
        SpecialVocab(Path(tmp), load_merges=not byte_fallback, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
        if tokenizer.chat_template and "tokenizer.chat_template" not in writer.kv_data[0]:
            writer.add_chat_template(tokenizer.chat_template)


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" in front of the text (Llama 2, Mistral: a Prepend
    normalizer, or a Metaspace pre-tokenizer that prepends), as llama.cpp assumes unless told otherwise."""
    def steps(part: dict | None, key: str) -> list[dict]:
        part = part or {}
        return part.get(key, []) if part.get("type") == "Sequence" else [part]

    for step in steps(tokenizer_json.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    for step in steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" \
                and step.get("add_prefix_space", True):
            return True
    return False


# The pre-tokenizers llama.cpp knows by name (llama-vocab.cpp), recognised from tokenizer.json: the
# regex of a Split step (with a ByteLevel step that no longer splits), or GPT-2's own ByteLevel split
# with or without single digits first. llama.cpp's converter names them by hashing a tokenization
# instead; the table here covers the families nf4tune supports.
_SPLIT_REGEX_NAMES = {
    # Llama 3 (and 3.1/3.2): numbers in runs of up to three digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5: single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (how text is split before BPE merges); one it
    has no name for gets llama.cpp's default split, with a warning."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after single digits (SmolLM, SmolLM2)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_REGEX_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    log.warning("nf4tune: the tokenizer's pre-tokenizer (%s) has no llama.cpp name known to nf4tune; llama.cpp will "
                "split text with its default rules, which may tokenize some texts differently.", " + ".join(map(str, kinds)))
    return "default"


def check_exportable(config: dict, kind: str) -> "ExportPlan":
    """The export plan for a model of `config` at --type `kind`, or the one-sentence reason llama.cpp could not run
    it; from the config alone, so a refusal comes before any tokenizer or weight is read."""
    check_export_type(kind)
    plan = ExportPlan.for_config(config)
    if EXPORT_TYPES[kind][0] == "Q4_K_M" and plan.spec.gguf_fused_qkv:
        raise Nf4tuneError(f"llama.cpp's Q4_K_M puts {config['model_type']}'s fused attn_qkv matrices in Q5_K, which nf4tune "
                           "cannot make; export --type f16 and run llama.cpp's `llama-quantize OUT.gguf OUT-q4_k_m.gguf Q4_K_M`.")
    return plan


@contextlib.contextmanager
def _atomic_gguf_writer(out_path: Path, arch: str) -> Iterator:
    """A GGUFWriter whose file appears at `out_path` only once complete: written to a temporary name beside it, the
    tensor data spooled to an unnamed file there (not /tmp: a large model may not fit), renamed at the end; nothing is
    left behind on an error."""
    gguf = require_gguf()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, arch, use_temp_file=True)
    writer.temp_file = tempfile.TemporaryFile(dir=out_path.parent)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()  # the tensor table, then the spooled data
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


_VOCABULARY_TENSORS = ("token_embd.weight", "output.weight")


def check_vocabulary_rows(n_tokens: int, rows: dict[str, int]) -> None:
    """llama.cpp sizes token_embd and output by the vocabulary and refuses a file whose tensors differ ("wrong shape"):
    such a file is never written."""
    for gguf_name, n in sorted(rows.items(), key=lambda item: _VOCABULARY_TENSORS.index(item[0])):
        if n != n_tokens:
            raise Nf4tuneError(f"{gguf_name} has {n} rows but the vocabulary has {n_tokens} tokens (the config's "
                               "vocab_size), so llama.cpp would refuse the file; the config does not match the weights.")


def write_gguf(
    out_path: Path,
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    kind: str,
    name: str,
    tokenizer=None,
    source_gguf: Path | None = None,
) -> int:
    """Write `tensors` (transformers keys, merged 16/32-bit weights, consumed one at a time) as a GGUF
    llama.cpp loads; the tokenizer from `source_gguf`'s metadata when given, else from `tokenizer`, its vocabulary
    padded to the config's vocab_size. Atomic: a temporary file beside `out_path`, renamed when complete.
    Returns the tensor count."""
    plan = check_exportable(config, kind)
    n_vocab = config["vocab_size"]
    with _atomic_gguf_writer(Path(out_path), plan.arch) as writer:
        plan.add_metadata(writer, name, kind)
        if source_gguf is not None:
            copy_tokenizer_fields(writer, source_gguf, n_vocab)
        elif tokenizer is not None:
            add_hf_tokenizer(writer, tokenizer, n_vocab)
        else:
            raise Nf4tuneError("the base model has no tokenizer; llama.cpp needs one in the GGUF file.")
        count = 0
        has_output = plan.has_output  # llama.cpp's has_output: a separate output.weight
        rows = {}
        for key, w in tensors:
            gguf_name = plan.gguf_name(key)
            if gguf_name is None:
                continue
            if gguf_name in _VOCABULARY_TENSORS:
                rows[gguf_name] = w.shape[0]
            qtype = tensor_type(gguf_name, w, kind, config["num_hidden_layers"], has_output)
            array, qtype = to_gguf_array(gguf_name, plan.layout(gguf_name, w), qtype)
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
            count += 1
        for gguf_name, w in plan.extra_tensors():  # 1-D float32, as llama.cpp's converter writes them
            writer.add_tensor(gguf_name, w.to(torch.float32).numpy())
            count += 1
        check_vocabulary_rows(len(writer.kv_data[0]["tokenizer.ggml.tokens"].value), rows)
        return count


# --type choices for an adapter-only file: float types, as llama.cpp's convert_lora_to_gguf.py writes them (B's rows
# are only a rank wide, narrower than any quantization block).
ADAPTER_EXPORT_TYPES = ("f16", "bf16", "f32")


def check_adapter_type(kind: str) -> None:
    """Refuse a --type an adapter-only GGUF is not written in, with a sentence."""
    if kind not in ADAPTER_EXPORT_TYPES:
        raise Nf4tuneError(f"an adapter-only GGUF is written as {', '.join(ADAPTER_EXPORT_TYPES)}, not --type {kind}; "
                           "llama.cpp applies it on a base GGUF of any type.")


def llama_cpp_lora_alpha(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """adapter.lora.alpha for llama.cpp, which scales each B @ A by alpha / rank: the one alpha that gives the
    adapter's own factor (`pairs`: module -> (A, B, PEFT's scaling)), alpha itself for plain LoRA, alpha * sqrt(r)
    for rank-stabilized LoRA's alpha / sqrt(r). Modules whose factor differs get the difference in B (write_lora_gguf)."""
    a, _, scaling = next(iter(pairs.values()))
    return scaling * a.shape[0]


def write_lora_gguf(out_path: Path, config: dict, pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                    kind: str, name: str) -> int:
    """Write a LoRA adapter (`pairs`: module name -> (A, B, PEFT's scaling)) for a base model of `config` as the LoRA
    GGUF llama.cpp applies on the base's own GGUF (`llama-cli -m base.gguf --lora adapter.gguf`), as its
    convert_lora_to_gguf.py writes one: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and per
    module `<llama.cpp name>.lora_a` (A, rank x in) and `.lora_b` (B, out x rank, its rows in the layout the base's
    weight has there: Q/K in llama.cpp's rotary order). Atomic, as write_gguf. Returns the tensor count."""
    gguf = require_gguf()
    check_adapter_type(kind)
    plan = check_exportable(config, kind)
    alpha = llama_cpp_lora_alpha(pairs)
    count = 0
    with _atomic_gguf_writer(Path(out_path), plan.arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, (a, b, scaling) in pairs.items():
            gguf_name = plan.gguf_name(f"{module}.weight")
            if gguf_name is None:
                raise Nf4tuneError(f"the adapter trains {module}, which llama.cpp's {plan.arch} models do not hold as a "
                                   "weight of their own, so it cannot be written as a llama.cpp adapter; export the "
                                   "merged model instead.")
            ratio = scaling / (alpha / a.shape[0])  # this module's factor over llama.cpp's alpha / rank
            if not math.isclose(ratio, 1.0, rel_tol=1e-6):
                b = b.float() * ratio
            for suffix, w in ((".lora_a", a), (".lora_b", plan.layout(gguf_name, b))):
                array, qtype = to_gguf_array(gguf_name + suffix, w, EXPORT_TYPES[kind][0])
                writer.add_tensor(gguf_name + suffix, array, raw_dtype=qtype)
                count += 1
    return count


def ollama_modelfile(gguf_path: Path, tokenizer, chat_template: str | None) -> str:
    """An Ollama Modelfile for `gguf_path`: the chat template in Go template syntax (ChatML or Llama-3 style
    recognized; otherwise a plain prompt) and the end-of-turn tokens as stop words."""
    template = chat_template or ""
    stops: list[str] = []
    if "<|im_start|>" in template:
        go = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
              '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
              '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n')
        stops = ["<|im_end|>", "<|im_start|>"]
    elif "<|start_header_id|>" in template:
        go = ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
              '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
              '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>')
        stops = ["<|eot_id|>", "<|start_header_id|>"]
    else:
        go = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}{{ .Response }}"
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{go}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
