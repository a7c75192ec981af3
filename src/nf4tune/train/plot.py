"""`loss.png`: training and eval loss curves, and below them the recipe's benchmark scores
(`eval.benchmarks`: `{name}_accuracy`, `{name}_perplexity` in metrics.jsonl) on the same steps,
drawn without a plotting library.

`figure_panels` decides what is drawn (one panel per kind of value, each with its label and
series); matplotlib draws it when installed, otherwise a small rasterizer draws the axes, the
curves, tick labels and a legend with a 5x7 bitmap font, and writes the PNG with zlib.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 420, 70, 20, 20, 45  # TOP leaves room for the "loss" label
PANEL_H = 240  # the height of each panel below the loss
TRAIN, EVAL, AXIS, GRID = (31, 119, 180), (255, 127, 14), (40, 40, 40), (225, 225, 225)
COLORS = (TRAIN, EVAL, (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194))
# Benchmark score kinds, by the suffix evaluate/benchmarks.py gives their metrics.jsonl keys; each its own panel.
BENCHMARK_KINDS = ("accuracy", "perplexity")
NOT_BENCHMARKS = {"eval_perplexity"}  # the loop's exp(eval_loss), already drawn as the eval loss

_FONT = {  # 5x7 glyphs, rows top to bottom
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "a": "00000 00000 01110 00001 01111 10001 01111", "e": "00000 00000 01110 10001 11111 10000 01110",
    "i": "00100 00000 01100 00100 00100 00100 01110", "l": "01100 00100 00100 00100 00100 00100 01110",
    "n": "00000 00000 10110 11001 10001 10001 10001", "o": "00000 00000 01110 10001 10001 10001 01110",
    "p": "00000 00000 11110 10001 11110 10000 10000", "r": "00000 00000 10110 11001 10000 10000 10000",
    "s": "00000 00000 01111 10000 01110 00001 11110", "t": "01000 01000 11100 01000 01000 01001 00110",
    "v": "00000 00000 10001 10001 10001 01010 00100", " ": "00000 00000 00000 00000 00000 00000 00000",
    "b": "10000 10000 10110 11001 10001 10001 11110", "c": "00000 00000 01110 10000 10000 10001 01110",
    "d": "00001 00001 01101 10011 10001 10001 01111", "f": "00110 01001 01000 11100 01000 01000 01000",
    "g": "00000 01111 10001 10001 01111 00001 01110", "h": "10000 10000 10110 11001 10001 10001 10001",
    "j": "00010 00000 00110 00010 00010 10010 01100", "k": "10000 10000 10010 10100 11000 10100 10010",
    "m": "00000 00000 11010 10101 10101 10001 10001", "q": "00000 00000 01101 10011 01111 00001 00001",
    "u": "00000 00000 10001 10001 10001 10011 01101", "w": "00000 00000 10001 10001 10101 10101 01010",
    "x": "00000 00000 10001 01010 00100 01010 10001", "y": "00000 00000 10001 10001 01111 00001 01110",
    "z": "00000 00000 11111 00010 00100 01000 11111", "_": "00000 00000 00000 00000 00000 00000 11111",
}


def _text(img: torch.Tensor, x: int, y: int, s: str, color) -> None:
    height = img.shape[0]
    for ch in s:
        rows = _FONT.get(ch, _FONT.get(ch.lower(), _FONT[" "])).split()
        for dy, row in enumerate(rows):
            for dx, bit in enumerate(row):
                if bit == "1" and 0 <= y + dy < height and 0 <= x + dx < W:
                    img[y + dy, x + dx] = torch.tensor(color, dtype=torch.uint8)
        x += 6


def _line(img: torch.Tensor, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = torch.linspace(x0, x1, n).round().long()
    ys = torch.linspace(y0, y1, n).round().long()
    for o in range(width):
        img[(ys + o).clamp(0, img.shape[0] - 1), xs.clamp(0, W - 1)] = torch.tensor(color, dtype=torch.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}"


def nice_ticks(lo: float, hi: float, most: int = 6, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten (0, 50, 100, ...
    rather than 10, 82, 155), at most `most` of them."""
    import math

    if not hi > lo:
        return [lo]
    raw = (hi - lo) / most
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _write_png(img: torch.Tensor, path: Path) -> None:
    height = img.shape[0]
    raw = b"".join(b"\x00" + bytes(img[y].flatten().tolist()) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


@dataclass
class Panel:
    """One panel of the figure: its y-axis label and its named series of (step, value) points."""

    ylabel: str
    series: list[tuple[str, list[tuple[float, float]]]]


def benchmark_keys(records: list[dict]) -> dict[str, list[str]]:
    """The benchmark score keys in `records`, by kind (`accuracy`, `perplexity`), in first-seen order."""
    found: dict[str, list[str]] = {kind: [] for kind in BENCHMARK_KINDS}
    for r in records:
        for key in r:
            kind = key.rpartition("_")[2]
            if kind in found and key not in NOT_BENCHMARKS and key not in found[kind] and key != kind:
                found[kind].append(key)
    return {kind: keys for kind, keys in found.items() if keys}


def figure_panels(records: list[dict]) -> list[Panel]:
    """What `plot_losses` draws: the loss panel (train and eval loss), then one panel per kind of
    benchmark score present (accuracy, perplexity), all against the step."""
    def points(key):
        return [(r["step"], r[key]) for r in records if key in r and "step" in r]

    loss = Panel("loss", [(label, p) for label, p in (("train loss", points("loss")), ("eval loss", points("eval_loss")))
                          if p or label == "train loss"])
    return [loss] + [Panel(kind, [(key.replace("_", " "), points(key)) for key in keys])
                     for kind, keys in benchmark_keys(records).items()]


def plot_losses(records: list[dict], path: str | Path) -> Path:
    """Draw training `loss` and `eval_loss` against `step` from metrics records into `path`, and the
    benchmark scores (`{name}_accuracy`, `{name}_perplexity`) in panels below, on the same steps."""
    path = Path(path)
    panels = figure_panels(records)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        heights = [H] + [PANEL_H] * (len(panels) - 1)
        fig, axes = plt.subplots(len(panels), 1, figsize=(7.2, sum(heights) / 100), sharex=True, squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, panel in zip(axes[:, 0], panels):
            for label, series in panel.series:
                if series:
                    ax.plot(*zip(*series), "-" if label == "train loss" else "o-", label=label)
            ax.set_ylabel(panel.ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    except ImportError:
        pass

    steps = [x for panel in panels for _, series in panel.series for x, _ in series]
    x_range = (min(steps), max(steps)) if steps else None
    img = torch.full((H + PANEL_H * (len(panels) - 1), W, 3), 255, dtype=torch.uint8)
    top = 0
    for i, panel in enumerate(panels):
        height = H if i == 0 else PANEL_H
        _draw_panel(img, panel, top, top + height, x_range, x_label=i == len(panels) - 1)
        top += height
    _write_png(img, path)
    return path


def _draw_panel(img: torch.Tensor, panel: Panel, y0: int, y1: int, x_range, x_label: bool) -> None:
    """One panel between image rows y0 and y1: grid, ticks, curves, its label and legend."""
    top, bottom = y0 + TOP, y1 - BOTTOM
    points = [p for _, series in panel.series for p in series]
    if points and x_range:
        x_lo, x_hi = x_range
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad
        px = lambda x: LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)  # noqa: E731
        py = lambda y: top + (y_hi - y) / (y_hi - y_lo) * (bottom - top)  # noqa: E731
        for yv in nice_ticks(y_lo, y_hi):  # grid and tick labels at round values
            _line(img, LEFT, py(yv), W - RIGHT, py(yv), GRID, 1)
            _text(img, 4, int(py(yv)) - 3, _fmt(yv), AXIS)
        for xv in nice_ticks(x_lo, x_hi, integer=True):
            label = _fmt(xv)
            _line(img, px(xv), bottom, px(xv), bottom + 4, AXIS, 1)
            _text(img, int(px(xv)) - 3 * len(label), bottom + 8, label, AXIS)
        for (_, series), color in zip(panel.series, COLORS):
            for (xa, ya), (xb, yb) in zip(series, series[1:]):
                _line(img, px(xa), py(ya), px(xb), py(yb), color)
            for x, y in series if len(series) < 60 else []:  # markers on sparse series
                cx, cy = int(px(x)), int(py(y))
                img[max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3] = torch.tensor(color, dtype=torch.uint8)
    _line(img, LEFT, top, LEFT, bottom, AXIS, 1)
    _line(img, LEFT, bottom, W - RIGHT, bottom, AXIS, 1)
    if x_label:
        _text(img, (W - 24) // 2, y1 - 14, "step", AXIS)
    _text(img, 4, y0 + 4, panel.ylabel, AXIS)
    legend_x = W - RIGHT - 30 - 6 * max((len(label) for label, _ in panel.series), default=0)
    for k, ((label, _), color) in enumerate(zip(panel.series, COLORS)):
        _line(img, legend_x, top + 8 + 14 * k, legend_x + 20, top + 8 + 14 * k, color)
        _text(img, legend_x + 26, top + 5 + 14 * k, label, AXIS)
