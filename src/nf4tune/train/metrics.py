"""What a run logs as it goes: OUTPUT/metrics.jsonl (and TensorBoard), and the peak memory it measures."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class MetricsLog:
    """Records appended to OUTPUT/metrics.jsonl, one JSON object a line, and their scalars written to
    OUTPUT/runs for TensorBoard when it is installed. Rank 0 alone keeps one."""

    def __init__(self, out: Path):
        self.file = (out / "metrics.jsonl").open("a")
        self.board = _tensorboard(out)

    def write(self, record: dict, step: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _tensorboard(out: Path):
    """A TensorBoard writer into OUTPUT/runs when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "runs"))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after `step` by the run being resumed."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def peak_memory_gib(device: torch.device) -> float:
    """The peak memory of this process so far, in GiB: on CUDA the most its tensors held at once
    (`max_memory_allocated`); elsewhere the peak resident set of the process (`ru_maxrss`), which also
    counts the model's loading, the Python interpreter and torch itself."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory_summary(device: torch.device, reduce_max) -> dict:
    """summary.json's peak memory keys (the largest over ranks, through `reduce_max`), named by what they measure."""
    summary = {"peak_memory_gib": round(reduce_max(peak_memory_gib(device)), 3)}
    if device.type == "cuda":
        summary["peak_memory_reserved_gib"] = round(reduce_max(torch.cuda.max_memory_reserved(device) / 2**30), 3)
        summary["peak_memory_measure"] = "torch.cuda.max_memory_allocated (reserved: max_memory_reserved)"
    else:
        summary["peak_memory_measure"] = "peak resident set of the process (getrusage ru_maxrss)"
    return summary
