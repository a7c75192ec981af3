"""Batch-1 decoding and prefill speed with 4-bit weights: nf4tune vs transformers + bitsandbytes.

    python benchmarks/decode_speed.py [--new-tokens 32] [--prompt 128] [--rounds 3] [--lora-r 0]
                                      [--shape small|7b] [--device cpu|cuda] [--sides ...] [--batch 1]

--shape small: the ~170M-parameter Llama of the training benchmarks (hidden 1024, 8 layers, vocab
32000); --shape 7b: LLaMA-7B's shapes (hidden 4096, 32 layers, intermediate 11008), random bf16
weights written shard by shard (13.5 GB of disk and host memory for the peer's load). NF4 with
double quantization, bf16 compute; greedy decoding with the KV cache: nf4tune through the
decoder `nf4tune chat/generate/serve` take on the device (`dispatch.path("decode")`: the static-cache
decoder on CUDA, `serve.decoder.Decoder` on an AVX-512 CPU, else `generate`); `nf4tune-generate` is
transformers' `generate` on nf4tune's model; the peer is `generate`. Decoding reads every 4-bit
weight and the 16-bit head once per token, so tokens/s x those bytes is the bandwidth it achieves;
it is reported against the device's bandwidth measured here (a large copy on CUDA, a large read
on CPU).
With --lora-r R, both sides decode through an unmerged LoRA adapter of rank R on every linear layer
(nf4tune's own; peft's on the bitsandbytes model). Each side in its own process, the two alternating
for --rounds rounds (this machine's speed drifts); the medians are reported. Decode tokens/s
excludes the prefill (first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import load_bnb  # noqa: E402
from harness import run_side as run_child
from train_step import build  # noqa: E402

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def build_random(path: Path, shape: dict) -> None:
    """A random bf16 Llama checkpoint of `shape`, written a few layers per shard (never whole in memory)."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        names = {n: t.shape for n, t in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault("rest" if layer == "rest" else str(int(layer) // 4), []).append(name)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, (_, group) in enumerate(sorted(groups.items())):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.ones(names[n], dtype=torch.bfloat16) if n.endswith("norm.weight") else
                   (torch.randn(names[n], generator=gen) * 0.02).to(torch.bfloat16) for n in group}
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)


def weight_bytes(model) -> int:
    """Bytes a decoded token reads: the 4-bit weights with their constants, and the output head."""
    import nf4tune

    total = sum(b.nbytes for m in model.modules() if isinstance(m, nf4tune.Linear4bit)
                for b in (m.weight_packed, m.weight_absmax, m.weight_nested_absmax) if b is not None)
    return total + model.get_output_embeddings().weight.nbytes


def device_bandwidth(device: str) -> float:
    """Bytes per second this device moves: a 1 GiB copy on CUDA (read + write), a 1 GiB read on CPU."""
    x = torch.ones(1 << 28, dtype=torch.float32, device=device)
    if device == "cuda":
        y = torch.empty_like(x)
        op, moved, sync = (lambda: y.copy_(x)), 2 * x.nbytes, torch.cuda.synchronize
    else:
        op, moved, sync = x.sum, x.nbytes, (lambda: None)
    op()
    sync()
    start = time.perf_counter()
    for _ in range(5):
        op()
    sync()
    return 5 * moved / (time.perf_counter() - start)


def run_side(side: str, path: Path, args) -> dict:
    if side.startswith("nf4tune"):
        import nf4tune

        lora = nf4tune.LoraConfig(r=args.lora_r, alpha=16, dropout=0.0) if args.lora_r else None
        model, _ = nf4tune.load_model(path, device=args.device, progress=False, lora=lora)
    else:
        model = load_bnb(path, args.device)
        if args.lora_r:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    model.eval()
    ids = torch.randint(0, 32000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    decoder = None
    if side == "nf4tune":  # what `nf4tune chat / generate / serve` use, as dispatch chooses it for this device
        from nf4tune import dispatch
        from nf4tune.serve.decoder import Decoder
        from nf4tune.serve.sampling import Sampling
        from nf4tune.serve.static_decoder import StaticDecoder

        chosen = dispatch.path("decode", next(model.parameters()))
        if chosen.static_mode is not None and StaticDecoder.unsupported(model) is None:
            decoder = StaticDecoder(model, args.batch, args.prompt + args.new_tokens,
                                    mode=chosen.static_mode)
        elif Decoder.unsupported(model) is None:
            decoder = Decoder(model)

    def timed(n):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            if decoder is not None:
                decoder.generate(ids, Sampling(max_new_tokens=n))  # no end-of-sequence: exactly n tokens
            else:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    timed(2)  # warm-up (the static decoder compiles, and on CUDA captures its graph, here)
    prefill = min(timed(1) for _ in range(3))
    total = min(timed(args.new_tokens) for _ in range(2))  # the best of two: noise only ever adds time
    result = {"prefill_s": prefill, "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / max(total - prefill, 1e-9)}
    result["decoder"] = type(decoder).__name__ if decoder is not None else "generate"
    if side == "nf4tune":
        result["weight_bytes"] = weight_bytes(model)
        result["bandwidth"] = device_bandwidth(args.device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=0, help="decode through a LoRA adapter of this rank")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (tokens/s counts them all)")
    parser.add_argument("--shape", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", default="nf4tune,nf4tune-generate,transformers+bnb",
                        help="nf4tune: its decoder (what chat/generate/serve run for one request); nf4tune-generate: "
                        "transformers' generate on nf4tune's model; transformers+bnb: the peer")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "small":
            build(Path(tmp))
        else:
            build_random(Path(tmp), SHAPE_7B)
        rounds = {side: [] for side in args.sides.split(",")}
        for _ in range(args.rounds):
            for side in rounds:
                rounds[side].append(run_child(__file__, side, "--model", tmp, "--device", args.device,
                                              "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt),
                                              "--lora-r", str(args.lora_r), "--batch", str(args.batch)))
    print(f"# {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, batch {args.batch}, {args.rounds} interleaved rounds, LoRA r={args.lora_r}")
    print("| side | prefill ms per round | decode tokens/s per round | median prefill ms | median decode tokens/s |")
    print("|---|---|---|---|---|")
    median = {}
    for side, rs in rounds.items():
        prefill = [r["prefill_s"] * 1e3 for r in rs]
        decode = [r["decode_tokens_per_s"] for r in rs]
        median[side] = statistics.median(prefill), statistics.median(decode)
        print(f"| {side} | {', '.join(f'{p:.0f}' for p in prefill)} | {', '.join(f'{d:.1f}' for d in decode)} | "
              f"{median[side][0]:.0f} | {median[side][1]:.1f} |")
    (pa, da), (pb, db) = median["nf4tune"], median["transformers+bnb"]
    print(f"\nnf4tune / bnb (medians): decode {da / db:.2f}x, prefill {pb / pa:.2f}x"
          f" (nf4tune decoded with {rounds['nf4tune'][0]['decoder']})")
    if "nf4tune-generate" in median:
        pg, dg = median["nf4tune-generate"]
        print(f"nf4tune's model through transformers' generate / bnb: decode {dg / db:.2f}x, prefill {pb / pg:.2f}x")
    ours = rounds["nf4tune"][0]
    gb, bw = ours["weight_bytes"] / 1e9, statistics.median(r["bandwidth"] for r in rounds["nf4tune"]) / 1e9
    sa, sb = da / args.batch, db / args.batch  # decoding steps per second: each reads the weights once
    print(f"bytes read per step: {gb:.3f} GB; measured device bandwidth {bw:.1f} GB/s; decode achieves "
          f"{gb * sa:.1f} GB/s ({gb * sa / bw:.0%}) for nf4tune, {gb * sb:.1f} GB/s ({gb * sb / bw:.0%}) for bitsandbytes")


if __name__ == "__main__":
    main()
