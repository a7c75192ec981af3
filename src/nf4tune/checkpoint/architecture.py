"""What transformers builds from a config: the config object, the model class, a model on the meta
device, and which of its linear layers transformers + bitsandbytes quantize (so nf4tune quantizes the
same ones). Below the checkpoint readers (hf.py, gguf.py) and the tiny-model builder, which all use it."""

from __future__ import annotations

import re

import torch

from ..errors import Nf4tuneError


def to_config(config: dict):
    """A transformers config object from config.json's dict, or a clear error for an unknown model."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    try:
        cfg = AutoConfig.for_model(**config) if model_type else None
    except (ValueError, KeyError) as e:
        cfg = None
        reason = str(e).splitlines()[0]
    else:
        reason = "config.json names no model_type"
    if cfg is None:
        raise Nf4tuneError(
            f"unknown architecture {model_type!r} ({reason}); nf4tune knows the causal LMs of the installed "
            "transformers: upgrade transformers or check config.json."
        )
    return cfg


def is_encoder_decoder(cfg) -> bool:
    """Whether `cfg` (a transformers config, or config.json's dict) is an encoder-decoder (T5): the source
    goes to the encoder and the target to the decoder. transformers' own `is_encoder_decoder` flag decides,
    so every encoder-decoder it builds is treated alike, with no list of families to keep."""
    if isinstance(cfg, dict):
        cfg = to_config(cfg)
    return bool(getattr(cfg, "is_encoder_decoder", False))


def model_class(cfg):
    """The transformers auto class for `cfg`: a causal LM, or a seq2seq LM (T5) for encoder-decoders."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if is_encoder_decoder(cfg) else AutoModelForCausalLM


def build_meta_model(config: dict):
    """Instantiate the language model of `config` on the meta device (no memory), or explain why not."""
    cfg = to_config(config)
    model_type = config.get("model_type")
    try:
        with torch.device("meta"):
            return model_class(cfg).from_config(cfg)
    except ValueError as e:
        raise Nf4tuneError(
            f"architecture {model_type!r} is not a language model transformers can build "
            f"({str(e).splitlines()[0]})."
        ) from e


def _not_converted_modules(model) -> set[str]:
    """Module names transformers + bitsandbytes leave in 16-bit by default: the output embeddings
    (lm_head), weights tied to other weights, the module holding the last parameter, and the
    model's `_keep_in_fp32_modules`."""
    names: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names |= set(tied.keys()) | set(tied.values())
    params = list(model.named_parameters())
    if params:
        names.add(params[-1][0])
    output = model.get_output_embeddings()
    names |= {n for n, m in model.named_modules() if output is not None and m is output}
    names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {n.removesuffix(".weight") for n in names}


def matches_module(name: str, patterns: set[str]) -> bool:
    # As transformers does: a pattern matches from the start up to a module boundary, or as a suffix.
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{re.escape(p)}){boundary}", name) or name.endswith(p) for p in patterns)


def quantizable_linears(model) -> list[str]:
    """Names of the modules transformers + bitsandbytes quantize in `model`: every plain nn.Linear
    except the output head and the modules they keep in 16-bit."""
    skip = _not_converted_modules(model)
    return [name for name, module in model.named_modules() if type(module) is torch.nn.Linear and not matches_module(name, skip)]


def linear_weight_keys(config: dict) -> set[str]:
    """Checkpoint keys of the weights transformers + bitsandbytes quantize for this config."""
    return {f"{name}.weight" for name in quantizable_linears(build_meta_model(config))}
