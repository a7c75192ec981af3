"""Write config.json files for three mixture-of-experts models with their published dimensions, built offline from
transformers' config classes, so `nf4tune estimate` can size them without the Hub:

    python benchmarks/moe_configs.py /tmp/moe
    nf4tune estimate /tmp/moe/qwen3-30b-a3b --seq-len 2048

Dimensions (each model's config.json on the Hub): Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts (8 active) of
intermediate 768, 32 query / 4 key-value heads of 128, vocabulary 151936. Mixtral-8x7B: hidden 4096, 32 layers,
8 experts (2 active) of 14336, 32 / 8 heads, vocabulary 32000. gpt-oss-20b: hidden 2880, 24 layers, 32 experts
(4 active) of 2880, 64 / 8 heads of 64, vocabulary 201088.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODELS = {
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
        tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralConfig", dict(
        hidden_size=4096, num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)),
    "gpt-oss-20b": ("GptOssConfig", dict(
        hidden_size=2880, num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, intermediate_size=2880,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088, tie_word_embeddings=False)),
}


def write(root: Path) -> dict[str, Path]:
    """Each model's config.json in a folder of its own under `root`."""
    import transformers

    paths = {}
    for name, (cls, kwargs) in MODELS.items():
        config = getattr(transformers, cls)(**kwargs)
        config.architectures = [cls.replace("Config", "ForCausalLM")]
        config.save_pretrained(root / name)
        paths[name] = root / name
    return paths


if __name__ == "__main__":
    for name, path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "moe-configs")).items():
        print(name, path)
