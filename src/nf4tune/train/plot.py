"""`loss.png`: training and eval loss curves, drawn without a plotting library.

matplotlib is used when installed; otherwise a small rasterizer draws the axes, the curves, tick
labels and a legend with a 5x7 bitmap font, and writes the PNG with zlib.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 420, 70, 20, 20, 45  # TOP leaves room for the "loss" label
TRAIN, EVAL, AXIS, GRID = (31, 119, 180), (255, 127, 14), (40, 40, 40), (225, 225, 225)

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
}


def _text(img: torch.Tensor, x: int, y: int, s: str, color) -> None:
    for ch in s:
        rows = _FONT.get(ch, _FONT[" "]).split()
        for dy, row in enumerate(rows):
            for dx, bit in enumerate(row):
                if bit == "1" and 0 <= y + dy < H and 0 <= x + dx < W:
                    img[y + dy, x + dx] = torch.tensor(color, dtype=torch.uint8)
        x += 6


def _line(img: torch.Tensor, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = torch.linspace(x0, x1, n).round().long()
    ys = torch.linspace(y0, y1, n).round().long()
    for o in range(width):
        img[(ys + o).clamp(0, H - 1), xs.clamp(0, W - 1)] = torch.tensor(color, dtype=torch.uint8)


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
    raw = b"".join(b"\x00" + bytes(img[y].flatten().tolist()) for y in range(H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def plot_losses(records: list[dict], path: str | Path) -> Path:
    """Draw training `loss` and `eval_loss` against `step` from metrics records into `path`."""
    path = Path(path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.2, 4.2))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    except ImportError:
        pass

    img = torch.full((H, W, 3), 255, dtype=torch.uint8)
    points = train + evals
    if points:
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad
        px = lambda x: LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)  # noqa: E731
        py = lambda y: TOP + (y_hi - y) / (y_hi - y_lo) * (H - TOP - BOTTOM)  # noqa: E731
        for yv in nice_ticks(y_lo, y_hi):  # grid and tick labels at round values
            _line(img, LEFT, py(yv), W - RIGHT, py(yv), GRID, 1)
            _text(img, 4, int(py(yv)) - 3, _fmt(yv), AXIS)
        for xv in nice_ticks(x_lo, x_hi, integer=True):
            label = _fmt(xv)
            _line(img, px(xv), H - BOTTOM, px(xv), H - BOTTOM + 4, AXIS, 1)
            _text(img, int(px(xv)) - 3 * len(label), H - BOTTOM + 8, label, AXIS)
        for series, color in ((train, TRAIN), (evals, EVAL)):
            for (x0, y0), (x1, y1) in zip(series, series[1:]):
                _line(img, px(x0), py(y0), px(x1), py(y1), color)
            for x, y in series if len(series) < 60 else []:  # markers on sparse series
                cx, cy = int(px(x)), int(py(y))
                img[max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3] = torch.tensor(color, dtype=torch.uint8)
    _line(img, LEFT, TOP, LEFT, H - BOTTOM, AXIS, 1)
    _line(img, LEFT, H - BOTTOM, W - RIGHT, H - BOTTOM, AXIS, 1)
    _text(img, (W - 24) // 2, H - 14, "step", AXIS)  # axis labels
    _text(img, 4, 4, "loss", AXIS)
    _line(img, W - 150, TOP + 8, W - 130, TOP + 8, TRAIN)
    _text(img, W - 124, TOP + 5, "train loss", AXIS)
    if evals:
        _line(img, W - 150, TOP + 22, W - 130, TOP + 22, EVAL)
        _text(img, W - 124, TOP + 19, "eval loss", AXIS)
    _write_png(img, path)
    return path
