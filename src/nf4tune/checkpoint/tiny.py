"""Tiny random checkpoints, built offline: for the demo, the tests and the benchmarks."""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Architectures with a tiny config each; the values keep every dimension a multiple of 16.
_DECODER = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_TINY_CONFIGS = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma": dict(_DECODER, head_dim=16),
    "phi3": _DECODER,
    "t5": dict(d_model=64, d_kv=16, d_ff=192, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
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


def build_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = "100KB",
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a small random causal LM with tokenizer to `path` as a sharded safetensors checkpoint."""
    from transformers import AutoConfig

    from .architecture import model_class

    tokenizer = char_tokenizer()
    kwargs = dict(_TINY_CONFIGS[arch], vocab_size=len(tokenizer), tie_word_embeddings=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "t5":
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
