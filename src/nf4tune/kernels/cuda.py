"""4-bit weights on CUDA through the Triton kernels of `triton_4bit.py` (imported on first CUDA use
only): `dequantize_4bit` and `Matmul4bit` (x @ W^T with W decoded on the fly, for decoding a few
tokens at a time: each 4-bit byte is read once and no 16-bit copy of the weight is written).

Both index in element space (element i sits in byte i // 2, high nibble first), so the layout is
bitsandbytes' own and any shape works. They are held to the PyTorch reference by tests that run them
through Triton's interpreter on CPU (TRITON_INTERPRET=1), and, since no GPU has run them when they
were written, they check themselves against the reference on first use on each device: a mismatch
or a compile error turns them off for the process, with a warning, and the reference paths serve
(`check` says which; `nf4tune.dispatch` asks it).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from ..quant.codes import code_4bit, dynamic_code, on_device
from . import base

log = logging.getLogger(__name__)

def _grid(n: int, block: int) -> int:
    return (n + block - 1) // block


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """All n values of a 4-bit tensor, from float32 absmax and the float32 code table on the same
    device, in `dtype` (bit-exact with the reference); written into `out` (n contiguous values) if given."""
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    block = 1024
    bf16 = dtype == torch.bfloat16
    from .triton_4bit import dequantize_kernel

    dequantize_kernel[(_grid(n, block),)](packed.reshape(-1), absmax.float().contiguous(),
                                           code, out.view(torch.int16) if bf16 else out,
                                           n, blocksize, BF16_BITS=bf16, BLOCK=block)
    return out


class Matmul4bit(base.Matmul4bit):
    """x @ W^T for one 4-bit `QuantizedTensor` W on CUDA, summed in float32, in x's dtype (or float32
    with `float32_out`): the same call as `kernels.cpu.Matmul4bit`."""

    BLOCK_N, BLOCK_K = 32, 128

    def __init__(self, q):
        self.q, self.n, self.k = q, q.shape[0], q.shape[1]
        device = q.packed.device
        self.code = on_device(device, code_4bit, q.quant_type)
        self.double_quant = q.double_quant
        if q.double_quant:
            self.absmax, self.nested = q.absmax.contiguous(), q.nested_absmax.contiguous()
            self.table = on_device(device, dynamic_code)
        else:
            self.absmax = q.absmax.float().contiguous()
            self.nested = self.table = self.absmax  # unused
        self.packed = q.packed.reshape(-1).contiguous()

    def __call__(self, x: torch.Tensor, float32_out: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features; the weight takes {self.k}")
        x2 = x.reshape(-1, self.k).contiguous()
        out = torch.empty(x2.shape[0], self.n, dtype=torch.float32 if float32_out else x.dtype, device=x.device)
        from .triton_4bit import matmul_kernel

        q = self.q
        matmul_kernel[(_grid(self.n, self.BLOCK_N), x2.shape[0])](
            x2, self.packed, self.absmax, self.nested, self.table, float(q.offset or 0.0), q.nested_blocksize,
            self.code, out, self.n, self.k, q.blocksize,
            DOUBLE_QUANT=self.double_quant, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K)
        return out.view(*x.shape[:-1], self.n)


def check(device: torch.device) -> str | None:
    """Why the kernels cannot serve tensors on this CUDA device (Triton missing, or the first-use
    check against the reference failed there), or None when they can."""
    if device.type != "cuda":
        return f"the tensor is on {device.type}"
    if not _triton_installed():
        return "Triton is not installed (it ships with CUDA builds of torch: pip install triton)"
    return _verified(device.index if device.index is not None else torch.cuda.current_device())


def self_check(device: torch.device) -> None:
    """Run both kernels on `device` against the reference; raise if anything differs."""
    from ..quant import blockwise, quantize

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 320, generator=gen).to(device)
    for double_quant in (False, True):
        q = quantize(w, double_quant=double_quant)
        absmax = q.float_absmax()
        ref = blockwise.dequantize_4bit(q.packed, absmax, q.shape, "nf4", q.blocksize, torch.float32)
        got = dequantize_4bit(q.packed, absmax, on_device(device, code_4bit, "nf4"), w.numel(), q.blocksize, torch.float32)
        x = torch.randn(3, 320, generator=gen).to(device)
        product = Matmul4bit(q)(x).double()
        expected = x.double() @ ref.view(96, 320).double().t()
        if not torch.equal(got.view(96, 320), ref) or (product - expected).abs().max() > 1e-4 * expected.abs().max():
            raise RuntimeError("results differ from the reference")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _verified(index: int) -> str | None:
    try:
        self_check(torch.device("cuda", index))
        return None
    except Exception as e:  # a compile error on this GPU, a wrong result: the reference paths serve
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("nf4tune: the Triton 4-bit kernels are off on cuda:%d (%s); using the PyTorch path.", index, first)
        return f"the Triton kernels failed their first-use check on cuda:{index} ({first})"
