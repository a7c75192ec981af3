"""Peak host memory while loading a multi-shard checkpoint in 4-bit: nf4tune vs transformers + bitsandbytes.

    python benchmarks/load_memory.py [--layers 16] [--shard 500MB]

Builds a random bf16 Llama (hidden 2048, intermediate 5632, vocab 32000; ~1B parameters with 16
layers) as a sharded safetensors checkpoint, then loads it in a fresh process per side and reports the
peak resident memory above the process's baseline after imports (sampled every 2 ms), next to the
target: quantized model size + largest shard + 0.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import PeakRSS, load_bnb, rss_bytes  # noqa: E402
from harness import run_side as run_child


def build(path: Path, layers: int, shard: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size=shard)


def model_bytes(model) -> int:
    """Bytes the loaded model holds: parameters, buffers (4-bit storage included)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    for m in model.modules():  # bitsandbytes keeps absmax in a quant_state object, not a buffer
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += qs.absmax.nbytes + (qs.state2.absmax.nbytes if qs.nested else 0)
    return total


def run_side(side: str, path: Path) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401  (imported for the baseline)

    import nf4tune  # noqa: F401  (imports count in the baseline, not the peak)

    baseline = rss_bytes()
    with PeakRSS() as peak:
        if side == "nf4tune":
            model, _ = nf4tune.load_model(path, device="cpu", progress=False)
        else:
            model = load_bnb(path, "cpu")
    return {"side": side, "peak_gib": (peak.peak - baseline) / 2**30, "model_gib": model_bytes(model) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard", default="500MB")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.model))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.layers, args.shard)
        shards = sorted(Path(tmp).glob("*.safetensors"))
        largest, total = max(s.stat().st_size for s in shards), sum(s.stat().st_size for s in shards)
        results = []
        for side in ("nf4tune", "transformers+bnb"):
            results.append(run_child(__file__, side, "--model", tmp))
    quantized = results[0]["model_gib"]
    target = quantized + largest / 2**30 + 0.5
    print(f"# checkpoint: {len(shards)} shards, {total / 2**30:.2f} GiB bf16, largest shard {largest / 2**30:.2f} GiB; "
          f"target peak <= {target:.2f} GiB (quantized {quantized:.2f} + largest shard + 0.5)")
    print("| side | peak host memory while loading GiB | loaded model GiB |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['side']} | {r['peak_gib']:.2f} | {r['model_gib']:.2f} |")


if __name__ == "__main__":
    main()
