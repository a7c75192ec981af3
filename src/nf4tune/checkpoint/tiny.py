"""Tiny random checkpoints, built offline: for the demo, the tests and the benchmarks."""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Architectures with a tiny config each; the values keep every dimension a multiple of 16. Where a
# family has a feature of its own (soft-capped logits, scaled logits and residuals, layers without
# rotary, sliding windows), its tiny config turns it on strongly enough to change the outputs, so a
# test that ignores the feature fails; Gemma-style families tie the head to the embedding as theirs do.
_DECODER = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_GEMMA = dict(_DECODER, head_dim=16, tie_word_embeddings=True)
_SLIDING = dict(query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
# T5's own dropout (0.1 by default; the decoder-only families have none) off: a tiny model trains deterministically,
# so tests can compare its training losses with transformers' losses.
_T5 = dict(d_model=64, d_kv=16, d_ff=192, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
_TINY_CONFIGS = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma": _GEMMA,
    "gemma2": dict(_GEMMA, **_SLIDING, final_logit_softcapping=2.0, attn_logit_softcapping=1.0),
    "gemma3_text": dict(_GEMMA, **_SLIDING),
    "phi3": _DECODER,
    # four layers: SmolLM3 (and llama.cpp's smollm3) leaves rotary out of every fourth
    "smollm3": dict(_DECODER, num_hidden_layers=4, tie_word_embeddings=True),
    "granite": dict(_DECODER, embedding_multiplier=12.0, attention_multiplier=0.1, residual_multiplier=0.5,
                    logits_scaling=4.0),
    "olmo2": _DECODER,
    "t5": _T5,
    "mt5": _T5,
    # Mixture-of-experts families: four experts, two per token, every layer sparse; each expert's weights fill
    # whole 64-element blocks, as in real models. Qwen2-MoE adds its shared expert; gpt-oss its transposed,
    # biased experts with interleaved gate / up columns.
    "qwen3_moe": dict(_DECODER, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(_DECODER, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_DECODER, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2),
    "gpt_oss": dict(_DECODER, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    "opt": dict(hidden_size=64, ffn_dim=192, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
}


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII plus <unk> <s> </s> <pad>), no download needed."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def byte_level_tokenizer():
    """char_tokenizer's vocabulary as a byte-level BPE tokenizer without merges (GPT-2's byte symbols:
    space is "Ġ", newline "Ċ"), which GGUF files hold: one token per character of ASCII text, and every
    token a whole character (other bytes are <unk>), so any reply decodes. No download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    # GPT-2's byte-to-symbol table on these bytes: printable ASCII is itself, bytes below 33 are chr(256 + byte)
    symbols = [c if 33 <= ord(c) <= 126 else chr(256 + ord(c)) for c in chars]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + symbols)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = "100KB",
    seed: int = 0,
    tokenizer=None,
    **overrides,
) -> Path:
    """Write a small random causal LM (or T5) with tokenizer to `path` as a sharded safetensors checkpoint.

    `tokenizer` (default: char_tokenizer()) is saved with it; its size and special tokens set the config's.
    """
    from transformers import AutoConfig

    from .architecture import model_class

    tokenizer = tokenizer or char_tokenizer()
    kwargs = dict(tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    kwargs.update(_TINY_CONFIGS[arch])
    if AutoConfig.for_model(arch).is_encoder_decoder:  # the decoder starts from padding, as T5's does
        kwargs["decoder_start_token_id"] = tokenizer.pad_token_id
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    # transformers initializes weights from the global RNG; fork it so building a model (for instance
    # the demo model on first use, inside a training run) leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).from_config(config, dtype=dtype)
    path = Path(path)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


def tiny_archs() -> tuple[str, ...]:
    """The model types build_tiny_checkpoint can build."""
    return tuple(_TINY_CONFIGS)


# Built-in tiny models, addressed as "tiny-random:<name>" wherever a model path is taken: built
# deterministically on first use into the cache folder, for offline demos and tests.
BUILTIN = {
    "llama-demo": dict(arch="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_shard_size=None),
}


def builtin_path(name: str) -> Path:
    """The folder of built-in tiny model `name`, building it on first use."""
    import os

    key = name.removeprefix("tiny-random:")
    if key not in BUILTIN:
        from ..errors import Nf4tuneError

        raise Nf4tuneError(f"unknown built-in model {name!r}; built-in models: "
                           + ", ".join(f"tiny-random:{k}" for k in BUILTIN))
    root = Path(os.environ.get("NF4TUNE_CACHE", Path.home() / ".cache" / "nf4tune"))
    path = root / key
    if not (path / "config.json").is_file():
        import shutil

        from ..atomic import temp_dir

        root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(root, prefix=f".{key}.", suffix="")
        try:
            build_tiny_checkpoint(tmp / "model", **BUILTIN[key])
            shutil.rmtree(path, ignore_errors=True)
            (tmp / "model").rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
