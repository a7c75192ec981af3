"""4-bit quantize / dequantize through `torch.compile` (Inductor's C++ backend), for large tensors on CPU.

Quantize: the absmax / scale / nearest-code / pack passes of the reference fused into one vectorized
loop; the code tables are unrolled into constants so the nearest-code search becomes 15 vector
compares. Dequantize: an int64-word formulation, 16 codes per word. Both handle whole blocks only
(the caller, `nf4tune.dispatch`, gives a partial last block to the reference) and return None where
this machine cannot compile; the tests hold them to `quant.blockwise` byte for byte.
"""

from __future__ import annotations

import functools

import torch

from ..quant import blockwise
from ..quant.codes import code_4bit
from . import compiled


@functools.cache
def _quantize_kernel(quant_type: str, blocksize: int):
    bounds, order = blockwise._bounds_4bit(quant_type, torch.device("cpu"))
    bounds, order = bounds.tolist(), order.tolist()

    def kernel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = w.float().view(-1, blocksize)
        absmax = x.abs().amax(1)
        scaled = (x * (1.0 / absmax.clamp(min=blockwise._TINY)).unsqueeze(1)).clamp(-1, 1)
        if order == sorted(order):  # NF4: the code is the count of midpoints below the value
            codes = (scaled > bounds[0]).to(torch.int32)
            for b in bounds[1:]:
                codes = codes + (scaled > b).to(torch.int32)
        else:  # FP4: codes are not in value order, so select the code of each bin
            codes = torch.full_like(scaled, order[0], dtype=torch.int32)
            for b, code in zip(bounds, order[1:]):
                codes = torch.where(scaled > b, code, codes)
        pairs = codes.to(torch.uint8).view(-1, 2)
        return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1), absmax

    return torch.compile(kernel, dynamic=True)


# Nibble k of a little-endian 64-bit word comes from byte k // 2, high nibble first.
_WORD_SHIFTS = [8 * (k // 2) + 4 * (1 - k % 2) for k in range(16)]


@functools.cache
def _dequantize_kernel(quant_type: str, blocksize: int, dtype: torch.dtype):
    def kernel(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        # 16 codes per int64 word: the inner loop is one 16-lane float vector.
        words = packed.view(torch.int64).view(-1, blocksize // 16, 1)
        values = code[(words >> shifts) & 15] * absmax.view(-1, 1, 1)
        return values.to(dtype).view(-1)

    return torch.compile(kernel, dynamic=True)


def quantize_4bit(flat: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`blockwise.quantize_4bit` of `flat` (a whole number of blocks), or None if compiling failed."""
    return compiled.run(_quantize_kernel(quant_type, blocksize), lambda _: None, flat)


def dequantize_4bit(flat: torch.Tensor, absmax: torch.Tensor, full: int, quant_type: str, blocksize: int,
                    dtype: torch.dtype) -> torch.Tensor | None:
    """The first `full` values (whole blocks) of the packed codes `flat`, or None if compiling failed."""
    if flat.data_ptr() % 8:  # viewing bytes as int64 words needs 8-byte alignment (mmapped files may lack it)
        flat = flat.clone()
    blocks = full // blocksize
    shifts = torch.tensor(_WORD_SHIFTS, dtype=torch.int64)
    return compiled.run(_dequantize_kernel(quant_type, blocksize, dtype), lambda *_: None,
                        flat[: full // 2], absmax[:blocks].float(), code_4bit(quant_type), shifts)
