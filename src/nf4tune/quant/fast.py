"""Fast paths for 4-bit quantize / dequantize, chosen by device and tensor size.

Dequantize: on CUDA the Triton kernel (`kernels.cuda`), on an AVX-512 CPU the native kernel
(`kernels.cpu`), else, for large tensors on CPU, `torch.compile` of an int64-word formulation.
Quantize: on CPU, large tensors go through `torch.compile` (Inductor's C++ backend), which fuses the
absmax / scale / nearest-code / pack passes of the reference into one vectorized loop; the code
tables are unrolled into constants so the nearest-code search becomes 15 vector compares.
Small tensors, other devices, and any machine where none of these is available use the reference
kernels in `blockwise`, which the tests hold the fast paths to, byte for byte.

Set NF4TUNE_COMPILE=0 / NF4TUNE_NATIVE=0 to turn the compiled / native paths off.
"""

from __future__ import annotations

import functools

import torch

from .. import compiled
from ..kernels import cpu as native
from ..kernels import cuda as cuda_kernels
from . import blockwise
from .codes import code_4bit, on_device


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


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `blockwise.quantize_4bit`, faster where it can be."""
    n = w.numel()
    full = n - n % blocksize
    if not compiled.enabled(w, full):
        return blockwise.quantize_4bit(w, quant_type, blocksize)
    flat = w.reshape(-1)
    head = compiled.run(_quantize_kernel(quant_type, blocksize), lambda _: None, flat[:full])
    if head is None:
        return blockwise.quantize_4bit(w, quant_type, blocksize)
    packed, absmax = head
    if full < n:  # a partial last block: the reference handles its quirks
        tail_packed, tail_absmax = blockwise.quantize_4bit(flat[full:], quant_type, blocksize)
        packed, absmax = torch.cat([packed, tail_packed]), torch.cat([absmax, tail_absmax])
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    quant_type: str,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Same result as `blockwise.dequantize_4bit`, faster where it can be."""
    n = 1
    for s in shape:
        n *= s
    full = n - n % blocksize

    def reference():
        return blockwise.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype)

    flat = packed.reshape(-1)
    if packed.is_cuda and cuda_kernels.usable(packed.device):
        code = on_device(packed.device, code_4bit, quant_type)
        return cuda_kernels.dequantize_4bit(flat, absmax, code, n, blocksize, dtype).view(shape)
    if packed.device.type == "cpu" and full and native.supports(flat, absmax, blocksize):
        head = native.dequantize_4bit(flat, absmax, code_4bit(quant_type), n, blocksize, dtype)
    elif compiled.enabled(packed, full):
        head = _dequantize_compiled(flat, absmax, full, quant_type, blocksize, dtype)
    else:
        return reference()
    if head is None:
        return reference()
    if full < n:
        tail = blockwise.dequantize_4bit(flat[full // 2 :], absmax[full // blocksize:], (n - full,), quant_type, blocksize, dtype)
        head = torch.cat([head, tail])
    return head.view(shape)


def _dequantize_compiled(flat, absmax, full, quant_type, blocksize, dtype):
    if flat.data_ptr() % 8:  # viewing bytes as int64 words needs 8-byte alignment (mmapped files may lack it)
        flat = flat.clone()
    blocks = full // blocksize
    code = code_4bit(quant_type)
    shifts = torch.tensor(_WORD_SHIFTS, dtype=torch.int64)
    return compiled.run(
        _dequantize_kernel(quant_type, blocksize, dtype), lambda *_: None,
        flat[: full // 2], absmax[:blocks].float(), code, shifts,
    )
