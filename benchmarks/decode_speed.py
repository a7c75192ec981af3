"""Batch-1 decoding and prefill speed with 4-bit weights: nf4tune vs transformers + bitsandbytes.

    python benchmarks/decode_speed.py [--new-tokens 32] [--prompt 128] [--rounds 3] [--lora-r 0]
                                      [--shape small|mini|7b] [--family llama] [--device cpu|cuda]
                                      [--sides ...] [--batch 1]

--shape small: the ~170M-parameter Llama of the training benchmarks (hidden 1024, 8 layers, vocab
32000); --shape mini: hidden 512, 4 layers, 8 heads, intermediate 1536, vocab 32000 (where per-token
overheads weigh most); with --family F (a transformers model_type: qwen3, gemma2, phi3, ...), that shape
as family F, random weights by transformers' initialization; --shape 7b: LLaMA-7B's shapes (hidden 4096,
32 layers, intermediate 11008), random bf16
weights written shard by shard (13.5 GB of disk and host memory for the peer's load). NF4 with
double quantization, bf16 compute; greedy decoding with the KV cache: nf4tune through the
decoder `nf4tune chat/generate/serve` take on the device (`dispatch.path("decode")`: the static-cache
decoder on CUDA, `serve.decoder.Decoder` on an AVX-512 CPU, else `generate`); `nf4tune-generate` is
transformers' `generate` on nf4tune's model; `nf4tune.generate` is the public in-process API (the
serving engine, text in and out: what `nf4tune generate` and `serve` run, per-token work included),
given the same token ids as text of a word-level tokenizer over the vocabulary; the peer is `generate`. Decoding reads every 4-bit
weight and the 16-bit head once per token, so tokens/s x those bytes is the bandwidth it achieves;
it is reported against the device's bandwidth measured here (a large copy on CUDA, a large read
on CPU).
With --lora-r R, both sides decode through an unmerged LoRA adapter of rank R on every linear layer
(nf4tune's own; peft's on the bitsandbytes model). Each side in its own process, the two alternating
for --rounds rounds (this machine's speed drifts); the medians are reported. Decode tokens/s
excludes the prefill (first token).

--paired N: on a busy machine, one process instead: nf4tune's model loaded once, then N pairs of
calls, each `nf4tune.generate` against transformers' `generate` on that same model (the order
alternating A B, B A), each call --new-tokens greedy tokens for --batch prompts of --prompt tokens, prefill
included; the ratio of each pair's times and their median are printed.
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
from train_step import CONFIG, build  # noqa: E402

SHAPE_MINI = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
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


def build_family(path: Path, family: str, shape: dict) -> None:
    """A random bf16 checkpoint of transformers' `family` (model_type) in `shape`, seed 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    heads = shape["num_attention_heads"]
    config = AutoConfig.for_model(family, **shape, head_dim=shape["hidden_size"] // heads)
    if (getattr(config, "pad_token_id", None) or 0) >= config.vocab_size:  # Phi-3's default is 32000
        config.pad_token_id = 0
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)


def word_tokenizer(vocab: int):
    """A word-level tokenizer with one word per id ("t0 t1 ..."), so token ids go through text unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


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
    import nf4tune

    if side.startswith("nf4tune"):

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
    if side == "nf4tune.generate":
        tokenizer = word_tokenizer(model.config.vocab_size)
        model.generation_config.eos_token_id = -1  # no end of sequence: exactly n tokens, as the other sides
        prompts = [" ".join(f"t{i}" for i in row) for row in ids.tolist()]
        assert tokenizer(prompts[0], add_special_tokens=False).input_ids == ids[0].tolist()
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
            if side == "nf4tune.generate":
                nf4tune.generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=args.batch)
            elif decoder is not None:
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
    if side == "nf4tune.generate":
        from nf4tune.serve import Engine

        engine = Engine(model, tokenizer)
        result["decoder"] = type(engine.decoder).__name__ if engine.decoder is not None else "generate"
        engine.close()
    if side in ("nf4tune", "nf4tune.generate"):
        result["weight_bytes"] = weight_bytes(model)
        result["bandwidth"] = device_bandwidth(args.device)
    return result


def paired(args, path: Path) -> None:
    """`--paired`: nf4tune.generate vs transformers' generate on the same loaded model, pair by pair."""
    import nf4tune

    model, _ = nf4tune.load_model(path, device=args.device, progress=False)
    model.eval().generation_config.eos_token_id = -1  # no end of sequence: exactly n tokens on both sides
    tokenizer = word_tokenizer(model.config.vocab_size)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    prompts = [" ".join(f"t{i}" for i in row) for row in ids.tolist()]

    def ours() -> float:
        start = time.perf_counter()
        nf4tune.generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch)
        return time.perf_counter() - start

    def theirs() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    ours(), theirs()  # warm-up
    pairs = []
    for i in range(args.paired):
        a, b = (ours(), theirs()) if i % 2 == 0 else tuple(reversed((theirs(), ours())))
        pairs.append((a, b))
    print(f"# {args.family} {args.shape}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, batch {args.batch}, {args.paired} pairs in one process")
    print("| pair | nf4tune.generate s | transformers generate s | speed-up |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(pairs):
        print(f"| {i + 1} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    ratios = sorted(b / a for a, b in pairs)
    print(f"\nmedian speed-up of nf4tune.generate over transformers' generate on the same model: "
          f"{statistics.median(ratios):.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=0, help="decode through a LoRA adapter of this rank")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (tokens/s counts them all)")
    parser.add_argument("--shape", choices=["small", "mini", "7b"], default="small")
    parser.add_argument("--family", default="llama", help="the model_type of the small / mini model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", default="nf4tune,nf4tune.generate,nf4tune-generate,transformers+bnb",
                        help="nf4tune: its decoder; nf4tune.generate: the public API (the serving engine); "
                        "nf4tune-generate: transformers' generate on nf4tune's model; transformers+bnb: the peer")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="N pairs of nf4tune.generate vs transformers' generate on one model in one process")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "small" and args.family == "llama":
            build(Path(tmp), CONFIG)
        elif args.shape != "7b":
            build_family(Path(tmp), args.family, CONFIG if args.shape == "small" else SHAPE_MINI)
        else:
            build_random(Path(tmp), SHAPE_7B)
        if args.paired:
            return paired(args, Path(tmp))
        rounds = {side: [] for side in args.sides.split(",")}
        for _ in range(args.rounds):
            for side in rounds:
                rounds[side].append(run_child(__file__, side, "--model", tmp, "--device", args.device,
                                              "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt),
                                              "--lora-r", str(args.lora_r), "--batch", str(args.batch),
                                              "--family", args.family))
    print(f"# {args.family} {args.shape}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"prompt {args.prompt}, "
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
    if "nf4tune.generate" in median and "nf4tune-generate" in median:
        (pe, de), (pg, dg) = median["nf4tune.generate"], median["nf4tune-generate"]
        print(f"\nnf4tune.generate / transformers' generate on the same model (medians): decode {de / dg:.2f}x, "
              f"prefill {pg / pe:.2f}x (the engine decoded with {rounds['nf4tune.generate'][0]['decoder']})")
    if "nf4tune" not in median or "transformers+bnb" not in median:
        return
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
