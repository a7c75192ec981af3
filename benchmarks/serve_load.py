"""`nf4tune serve` under load: N concurrent clients over M adapters, tokens/s and request latency.

    python benchmarks/serve_load.py [--clients 8] [--adapters 4] [--requests 4] [--tokens 32]
                                    [--hidden 512] [--layers 8] [--lora-r 16] [--max-batch 8]
                                    [--rounds 3] [--burst 128] [--burst-tokens 4]

A random Llama (char tokenizer, --hidden/--layers) quantized to NF4 on CPU, with --adapters random
LoRA adapters of rank --lora-r on every projection, served in this process on a free port. Each
client thread sends --requests completions one after another over its own connection (greedy,
exactly --tokens tokens each: end-of-sequence is ignored) and times each. Four runs:

  single:   every client asks for the same adapter (continuous batching);
  mixed:    client i asks for adapter i mod M; rows with different adapters share a batch, and a
            request that comes while others decode joins them at the next step;
  static:   the mixed load, rows with different adapters sharing a batch, but a batch formed once
            and run to its end before the next (no joining);
  grouped:  the mixed load on the engine's former policy: static batches that hold one adapter
            and one sampling setting only.

Each round runs the four one after another (the order rotating), for --rounds rounds: this shared
machine's speed drifts, so each is reported by its median round (tokens per second: generated tokens
over the run's wall time) and by the p50/p99 latency of all its requests.

Then a connection burst: --burst clients (0: none) connect at the same moment (a barrier), each on its
own new connection with no retry, and send one completion of --burst-tokens tokens; reported: how
many connections were answered (and with which statuses), and the p50/p99 latency from connecting
to the whole answer. --rounds 0 runs the burst alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.serve import Engine
from nf4tune.serve.server import Server


def build(root: Path, args) -> tuple[Path, dict[str, str]]:
    heads = args.hidden // 64
    base = build_tiny_checkpoint(root / "base", hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                                 num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                                 max_shard_size=None)
    adapters = {}
    for i in range(args.adapters):
        model, _ = nf4tune.load_model(base, device="cpu", progress=False,
                                      lora=nf4tune.LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0,
                                                              target_modules="all-linear"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
        adapters[f"a{i}"] = str(nf4tune.save_adapter(model, root / f"a{i}"))
    return base, adapters


def grouped(engine: Engine):
    """The former batching policy: a batch holds the first request's adapter and sampling only."""
    def take():
        with engine._lock:
            while not engine._waiting and not engine._stopped:
                engine._lock.wait()
            if engine._stopped:
                return []
            first = engine._waiting[0]
            batch = [r for r in engine._waiting
                     if (r.adapter, r.sampling) == (first.adapter, first.sampling)][: engine.max_batch]
            for r in batch:
                engine._waiting.remove(r)
            return batch
    return take


def static(engine: Engine):
    """Batches formed once (by `_take_batch`) and run to their end: nothing joins a running batch."""
    def admit(pending, live):
        if live:
            return []
        admitted = list(pending)
        pending.clear()
        return admitted
    return admit


def load(server: Server, models: list[str], args) -> dict:
    latencies, errors = [], []

    def client(model: str, index: int):
        conn = http.client.HTTPConnection(*server.address, timeout=600)
        for k in range(args.requests):
            body = json.dumps({"model": model, "prompt": f"Client {index} asks question {k}:", "max_tokens": args.tokens,
                               "temperature": 0})
            start = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            if response.status != 200 or reply["usage"]["completion_tokens"] != args.tokens:
                errors.append(reply)
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(models[i % len(models)], i)) for i in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens_per_s": args.clients * args.requests * args.tokens / wall, "latencies": latencies,
            "errors": len(errors)}


def burst(server: Server, models: list[str], clients: int, tokens: int) -> dict:
    """`clients` new connections at once, one completion each, no retries: statuses and latencies."""
    ready, answers = threading.Barrier(clients), []

    def client(index: int):
        ready.wait()
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(*server.address, timeout=600)
            body = json.dumps({"model": models[index % len(models)], "prompt": f"Burst client {index}:",
                               "max_tokens": tokens, "temperature": 0})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            answers.append((response.status, time.perf_counter() - start))
            conn.close()
        except OSError as e:  # refused, reset or timed out: not accepted
            answers.append((type(e).__name__, time.perf_counter() - start))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = sorted(seconds for status, seconds in answers if isinstance(status, int))
    statuses = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"connections": clients, "answered": len(latencies), "statuses": statuses,
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3) if latencies else None}


def summary(runs: list[dict]) -> dict:
    latencies = sorted(x for r in runs for x in r["latencies"])
    return {"tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
            "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "errors": sum(r["errors"] for r in runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--burst", type=int, default=128, help="connections opened at once for the burst (0: none)")
    p.add_argument("--burst-tokens", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(Path(tmp), args)
        model, tokenizer = nf4tune.load_model(base, device="cpu", progress=False)
        engine = Engine(model, tokenizer, adapters, max_batch=args.max_batch,
                        max_queue=max(4 * args.clients, args.burst))  # the burst is all queued, none refused
        engine.eos_ids = set()  # every reply exactly --tokens long
        server = Server(engine, port=0)
        server.start()
        print(f"decoder: {'nf4tune CPU decoder' if engine.decoder is not None else 'generate()'}; "
              f"{args.clients} clients x {args.requests} requests x {args.tokens} tokens, {args.adapters} adapters "
              f"(r={args.lora_r}), hidden {args.hidden}, {args.layers} layers, max batch {args.max_batch}, "
              f"{torch.get_num_threads()} threads", flush=True)
        names = list(adapters)
        load(server, names[:1], argparse.Namespace(**{**vars(args), "clients": 2, "requests": 1}))  # warm-up
        policies = {"single": (names[:1], {}), "mixed": (names, {}), "static": (names, {"_admit": static(engine)}),
                    "grouped": (names, {"_admit": static(engine), "_take_batch": grouped(engine)})}
        runs = {name: [] for name in policies}
        for round_ in range(args.rounds):
            order = list(policies)[round_ % len(policies):] + list(policies)[:round_ % len(policies)]
            for name in order:
                models, patches = policies[name]
                for attr in ("_admit", "_take_batch"):
                    engine.__dict__.pop(attr, None)
                engine.__dict__.update(patches)
                runs[name].append(load(server, models, args))
        for attr in ("_admit", "_take_batch"):
            engine.__dict__.pop(attr, None)
        burst_result = burst(server, names, args.burst, args.burst_tokens) if args.burst else None
        server.stop()
    results = {name: summary(r) for name, r in runs.items() if r}
    for name, r in results.items():
        print(f"{name:8s} {r['median_tokens_per_s']:8.1f} tok/s (rounds {r['tokens_per_s']})  "
              f"p50 {r['p50_s']:.2f} s  p99 {r['p99_s']:.2f} s  errors {r['errors']}")
    if burst_result is not None:
        b = burst_result
        print(f"burst    {b['answered']}/{b['connections']} connections answered {b['statuses']}  "
              f"p50 {b['p50_s']} s  p99 {b['p99_s']} s ({args.burst_tokens} tokens each)")
        results["burst"] = burst_result
    print(json.dumps(results))


if __name__ == "__main__":
    main()
