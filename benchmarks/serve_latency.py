"""`nf4tune serve` as a process: the time of one 64-token completion, on a tiny-vocabulary Llama (hidden 512, 4 layers).

    OMP_NUM_THREADS=2 python benchmarks/serve_latency.py [--tree PATH_OF_A_CHECKOUT] [--requests 5]

Builds the model (random weights, an end-of-sequence id it never produces, so every reply is 64 tokens), starts
`nf4tune serve` from `--tree` (default: this checkout) with the OMP_NUM_THREADS given, sends one warm-up request
and then `--requests` greedy completions one after another, prints each one's time, and stops the server with
Ctrl-C (SIGINT), printing its exit status. Give an older checkout as `--tree` to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import build_endless_llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(args.tree) / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_endless_llama(model, env)
        server = subprocess.Popen([sys.executable, "-m", "nf4tune.cli.main", "serve", str(model), "--port", "0",
                                   "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        address = server.stdout.readline().split(" on ")[1].split(" ")[0]
        body = json.dumps({"model": "model", "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}).encode()

        def ask() -> tuple[float, int]:
            start = time.perf_counter()
            request = urllib.request.Request(f"{address}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as answer:
                tokens = json.loads(answer.read())["usage"]["completion_tokens"]
            return time.perf_counter() - start, tokens

        ask()  # warm-up
        times = [ask() for _ in range(args.requests)]
        print(f"# {args.tree}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: ms per completion "
              f"(tokens): " + " ".join(f"{t * 1e3:.0f} ({n})" for t, n in times))
        server.send_signal(signal.SIGINT)
        print(f"exit status after Ctrl-C: {server.wait(60)}")


if __name__ == "__main__":
    main()
