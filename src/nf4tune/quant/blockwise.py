"""Blockwise absmax quantization, 4-bit and 8-bit, in plain PyTorch.

These are the reference kernels: written for clarity, they reproduce bitsandbytes' arithmetic
operation for operation (float32 scaling by the reciprocal of the block's absmax, ties between two
code values going to the lower one, the quirks of the last partial block), so the bytes they write
are the bytes bitsandbytes writes. Faster paths (`fast.py`) are tested against them.

Layout: the tensor is flattened row-major and cut into blocks of `blocksize` elements; the last
block may be shorter. 4-bit codes are packed two per byte, the first element in the high nibble.
"""

from __future__ import annotations

import functools

import torch

from .codes import code_4bit, on_device

# Smallest absmax used as a divisor, so an all-zero block scales to zeros instead of NaNs.
_TINY = 1e-38
# bitsandbytes' CPU 8-bit quantizer looks codes up in a table of this many bins over [-1, 1].
_LUT_BINS = 65536


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split float32 `flat` into blocks; return (absmax per block, flat values scaled into [-1, 1]).

    Full blocks are scaled by multiplying with 1/absmax; a trailing partial block is divided by its
    (clamped) absmax, which is also what is stored for it. Both are bitsandbytes' behaviour.
    """
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = (head * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp_(-1, 1)])
    return absmax, scaled


@functools.cache
def _bounds_4bit(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted code values, and the code index of each sorted position."""
    code = code_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return bounds.to(device), order.to(torch.uint8).to(device)


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w` to packed 4-bit codes.

    Returns (packed uint8 of shape (ceil(numel / 2), 1), float32 absmax per block).
    """
    flat = w.reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the spare nibble holds the code of 0
    bounds, order = _bounds_4bit(quant_type, w.device)
    # bucketize puts a value equal to a midpoint into the lower bin, as bitsandbytes does.
    codes = order[torch.bucketize(scaled, bounds)]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.unsqueeze(1), absmax


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed bytes -> one uint8 code per element (first element from the high nibble)."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)
    return codes[:numel]


def _apply_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """values (float32, flat) * absmax of their block, rounded once to `dtype`."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=dtype, device=values.device)
    blocks = full // blocksize
    torch.mul(values[:full].view(blocks, blocksize), absmax[:blocks].unsqueeze(1), out=out[:full].view(blocks, blocksize))
    if full < n:
        torch.mul(values[full:], absmax[blocks], out=out[full:])
    return out


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_4bit`: code value * block absmax, computed in float32, cast to `dtype`."""
    numel = 1
    for s in shape:
        numel *= s
    code = on_device(packed.device, code_4bit, quant_type)
    values = code[unpack_4bit(packed, numel).long()]
    return _apply_absmax(values, absmax.float(), blocksize, dtype).view(shape)


@functools.cache
def _lut_8bit(code_key: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: for each of 65536 evenly spaced points in [-1, 1], the index
    of the first code whose upper midpoint is not below the point."""
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_BINS, dtype=torch.float32)
    points = -1.0 + (2.0 * i) / (_LUT_BINS - 1)
    # The count of midpoints strictly below each point is the code index.
    lut = torch.searchsorted(midpoints, points, right=False)
    return lut.to(torch.uint8).to(device)


@functools.cache
def _nearest_tables(code_key: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact nearest-code lookup by the top 16 bits of a float32.

    All floats sharing their top 16 bits (sign, exponent, 7 mantissa bits) form an interval narrow
    enough to hold at most one midpoint between codes, so the nearest code of x in bin b is
    base[b] + (x > mid[b]), with mid[b] = inf where the bin holds no midpoint: the same answer as a
    binary search over the midpoints, ties to the lower code. None if some bin holds two midpoints.
    """
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    bins = torch.arange(65536, dtype=torch.int64) << 16
    edges = torch.stack([bins, bins | 0xFFFF]).to(torch.int32).view(torch.float32).nan_to_num(0.0).clamp(-1, 1)
    low, high = edges.min(0).values, edges.max(0).values
    inf_or_nan = ((torch.arange(65536) >> 7) & 0xFF) == 0xFF  # never met: inputs are clamped to [-1, 1]
    low[inf_or_nan], high[inf_or_nan] = 1.0, 1.0
    base, top = torch.bucketize(low, midpoints), torch.bucketize(high, midpoints)
    if (top - base > 1).any():
        return None
    mid = torch.where(top > base, midpoints[base.clamp(max=len(midpoints) - 1)], torch.tensor(float("inf")))
    return base.to(torch.uint8).to(device), mid.to(device)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    tables = _nearest_tables(tuple(code.tolist()), scaled.device)
    if tables is None:
        return torch.bucketize(scaled, ((code[:-1] + code[1:]) / 2).to(scaled.device)).to(torch.uint8)
    base, mid = tables
    b = (scaled.contiguous().view(torch.int32) >> 16) & 0xFFFF
    return base[b] + (scaled > mid[b]).to(torch.uint8)


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                  rounding: str = "lut") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with a sorted 256-value `code` (the dynamic code, say).

    rounding="lut" rounds like bitsandbytes' CPU kernel, which double quantization on CPU goes
    through: the scaled value is mapped to one of 65536 bins over [-1, 1] and the bin's precomputed
    nearest code taken. rounding="nearest" takes the exact nearest code (ties to the lower), as
    bitsandbytes' GPU kernels do; optimizer states need it, since the bins cannot tell apart the
    small values the dynamic code is made for.
    Returns (uint8 codes shaped like x, float32 absmax per block).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    zero_block = absmax == 0
    inv = torch.where(zero_block, 0.0, 1.0 / absmax)
    scaled = (padded * inv.unsqueeze(1)).clamp_(-1, 1)
    if rounding == "nearest":
        return _nearest_code(scaled, code).view(-1)[:n].view(x.shape), absmax
    # (v + 1) * 0.5 * 65535 + 0.5 in float32, then truncated: the kernel's bin index.
    index = ((scaled + 1.0) * 0.5 * (_LUT_BINS - 1) + 0.5).to(torch.int32)
    lut = _lut_8bit(tuple(code.tolist()), x.device)
    codes = lut[index.long()]
    codes[zero_block] = 0  # the kernel writes code 0 for an all-zero block
    return codes.view(-1)[:n].view(x.shape), absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Inverse of `quantize_8bit`, in float32."""
    values = code.to(codes.device)[codes.reshape(-1).long()]
    return _apply_absmax(values, absmax, blocksize, torch.float32).view(codes.shape)
