"""What the benchmarks share: memory sampling, and running each side in its own process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples this process's resident memory in a thread while the block runs."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def run_side(script: str, side: str, *args: str) -> dict:
    """Run `script --side SIDE ARGS...` in a fresh process and return the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{side} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])
