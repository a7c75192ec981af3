"""Where a token's time goes through `nf4tune.generate` (the serving engine on nf4tune's runtime), on CPU.

    python benchmarks/decode_profile.py [--shape small|mini] [--family llama] [--batch 1] [--new-tokens 64]

The model of benchmarks/decode_speed.py (same shapes and families), NF4 with double quantization, bf16
compute. The runtime's parts are wrapped in timers for one `nf4tune.generate` call of --new-tokens
greedy tokens per prompt (no end of sequence), after a warm-up call: the 4-bit projections (fused
kernel, bias and adapter), the attention over the KV cache, the norms, the embedding, the output head,
the prompt's prefill, the token draw and the engine's text per token (the streamer). What the timers
leave is the rest: the step's glue (rotary lookup, residual adds) and the engine's loop. Per decoded
token of one sequence, in ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import SHAPE_MINI, build_family, word_tokenizer  # noqa: E402
from train_step import CONFIG, build  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)
PREFILL = "prefill (the prompts)"
_in_prefill = [False]


def timed(owner, name: str, label: str) -> None:
    """Wrap owner.name so its time adds to SPENT[label]; within the prefill, only the prefill counts."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if _in_prefill[0]:
            return fn(*args, **kwargs)
        _in_prefill[0] = label == PREFILL
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start
            _in_prefill[0] = False

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["small", "mini"], default="small")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()

    import nf4tune
    from nf4tune.runtime import step
    from nf4tune.serve import batching, decoder, streaming

    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "small" and args.family == "llama":
            build(Path(tmp), CONFIG)
        else:
            build_family(Path(tmp), args.family, CONFIG if args.shape == "small" else SHAPE_MINI)
        model, _ = nf4tune.load_model(tmp, device="cpu", progress=False)
    model.eval().generation_config.eos_token_id = -1
    tokenizer = word_tokenizer(model.config.vocab_size)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    prompts = [" ".join(f"t{i}" for i in row) for row in ids.tolist()]

    def run(n: int) -> float:
        start = time.perf_counter()
        nf4tune.generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=args.batch)
        return time.perf_counter() - start

    run(2)  # warm-up
    timed(decoder.Decoder, "_linear", "4-bit projections (fused kernel + bias/adapter)")
    timed(decoder.Decoder, "attend", "attention over the KV cache (rotary, cache write)")
    timed(step.ModelStep, "norm", "RMSNorms")
    timed(step.ModelStep, "embed", "embedding")
    timed(step.ModelStep, "logits", "output head")
    timed(decoder.Decoder, "_prefill_into", PREFILL)
    timed(batching, "draw", "token draw (sampling)")
    timed(streaming.BatchStreamer, "take", "engine: text per token (streamer)")
    SPENT.clear()
    total = run(args.new_tokens)
    tokens = args.new_tokens * args.batch
    prefill = SPENT[PREFILL]
    print(f"# {args.family} {args.shape}, batch {args.batch}, {args.new_tokens} new tokens, prompt {args.prompt}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"total {total * 1e3:.0f} ms; prefill {prefill * 1e3:.0f} ms; decoding {(total - prefill) * 1e3 / tokens:.2f} "
          "ms per token per sequence")
    print("| part | ms per token per sequence | share of decoding |")
    print("|---|---|---|")
    decoding = total - prefill
    accounted = 0.0
    for label, spent in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        if label == PREFILL:
            continue
        accounted += spent
        print(f"| {label} | {spent * 1e3 / tokens:.3f} | {spent / decoding:.0%} |")
    rest = decoding - accounted
    print(f"| the rest: step glue (rotary lookup, residual adds), engine loop | {rest * 1e3 / tokens:.3f} | "
          f"{rest / decoding:.0%} |")


if __name__ == "__main__":
    main()
