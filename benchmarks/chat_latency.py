"""`nf4tune chat` as a process: the time of one 64-token reply, on a tiny-vocabulary Llama (hidden 512, 4 layers).

    OMP_NUM_THREADS=2 python benchmarks/chat_latency.py [--tree PATH_OF_A_CHECKOUT] [--replies 5]

Builds the model (random weights, an end-of-sequence id it never produces, so every reply is 64 tokens), starts
`nf4tune chat` from `--tree` (default: this checkout) with the OMP_NUM_THREADS given and its input on a pipe, and
sends one warm-up message and then `--replies` more, each followed by `/reset` (so every reply answers the same
prompt). A reply's time runs from writing its message to the chat's "(conversation reset)" line, which it prints
once the reply is done. Give an older checkout as `--tree` to compare.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import build_endless_llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--replies", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(args.tree) / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_endless_llama(model, env)
        chat = subprocess.Popen([sys.executable, "-m", "nf4tune.cli.main", "chat", str(model), "--device", "cpu",
                                 "--max-new-tokens", "64", "--temperature", "0"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

        def reply() -> float:
            start = time.perf_counter()
            chat.stdin.write("Once upon a time\n/reset\n")
            chat.stdin.flush()
            while "(conversation reset)" not in chat.stdout.readline():
                pass
            return time.perf_counter() - start

        reply()  # warm-up
        times = [reply() for _ in range(args.replies)]
        print(f"# {args.tree}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: ms per 64-token reply: "
              + " ".join(f"{t * 1e3:.0f}" for t in times))
        chat.stdin.close()
        print(f"exit status at the end of input: {chat.wait(60)}")


if __name__ == "__main__":
    main()
