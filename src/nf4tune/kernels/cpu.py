"""The AVX-512 CPU kernels of `cpu_kernels.cpp`: built on first use with the system C++ compiler
(the one torch.compile also needs), cached, and called through ctypes.

The kernels: `dequantize_4bit` (bit-exact with `blockwise.dequantize_4bit`), `matmul_4bit` (x @ W^T
with the 4-bit W decoded in registers, for decoding a few tokens at a time), `matmul_f32` (the
adapters' products while decoding), where the CPU has AVX512-BF16 `matmul_bf16` (for the 16-bit
output head), and `rms_norm` and `decode_attention` for `serve/decoder.py`. Where the CPU
lacks AVX-512, no compiler is found or the build fails, `kernels()` returns None (with a warning
for a failed build) and callers keep the PyTorch paths. NF4TUNE_NATIVE=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..quant.codes import code_4bit, dynamic_code

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: no fused multiply-adds the source did not ask for, so dequantized values round
# exactly as the PyTorch reference's.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: a concurrent process sees no half-written library


def library_path(compiler: str, cpu_flags: set[str]) -> Path:
    """Where the library built by `compiler` for a CPU with these flags is cached."""
    # -march=native ties the library to this CPU: its flags are part of the key.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, *sorted(cpu_flags)]).encode()).hexdigest()
    root = Path(os.environ.get("NF4TUNE_CACHE", Path.home() / ".cache" / "nf4tune"))
    return root / "kernels" / f"cpu-{key[:16]}.so"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _load(compiler: str, target: Path) -> ctypes.CDLL:
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError:  # a damaged cache entry: build it again
            target.unlink()
    _build(compiler, target)
    return ctypes.CDLL(str(target))


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be had here."""
    if os.environ.get("NF4TUNE_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:  # every AVX-512 CPU since Skylake-SP
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("nf4tune: no C++ compiler found; 4-bit CPU inference uses the slower PyTorch path.")
        return None
    try:
        lib = _load(compiler, library_path(compiler, flags))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("nf4tune: could not build the AVX-512 kernels (%s); using the PyTorch path.",
                    detail.strip().splitlines()[0] if detail.strip() else type(e).__name__)
        return None
    lib.dequantize_4bit.argtypes = [_P, _P, _P, _I64, _I64, _P, _INT, _INT]
    if hasattr(lib, "matmul_bf16"):  # built where the CPU has AVX512-BF16
        lib.matmul_bf16.argtypes = [_P, _I64, _I64, _P, _I64, _P, _INT]
    lib.matmul_4bit.argtypes = [_P, _INT, _I64, _P, _P, _INT, _INT]
    lib.matmul_f32.argtypes = [_P, _I64, _I64, _P, _I64, _P, _INT]
    lib.rms_norm.argtypes = [_P, _I64, _I64, _P, _F, _P]
    lib.decode_attention.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _F, _P, _INT]
    return lib


def supports(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> bool:
    """Whether `dequantize_4bit` takes these tensors: contiguous, on CPU, float32 absmax."""
    return (packed.device.type == "cpu" and packed.is_contiguous() and absmax.dtype == torch.float32
            and absmax.is_contiguous() and blocksize % 32 == 0 and kernels() is not None)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The first n // blocksize * blocksize values, in `dtype` (bfloat16 rounded in the kernel; other
    dtypes from float32, as the reference does)."""
    full = n - n % blocksize
    out = torch.empty(full, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    code = code.float().contiguous()
    kernels().dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), full, blocksize,
                              out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out if out.dtype == dtype else out.to(dtype)


class _Weight4bit(ctypes.Structure):
    """`Weight4bit` in cpu_kernels.cpp: one 4-bit weight, described once."""

    _fields_ = [("packed", _P), ("absmax_fp32", _P), ("absmax_codes", _P), ("nested", _P), ("dynamic_table", _P),
                ("offset", _F), ("group", _I64), ("code", _P), ("n", _I64), ("k", _I64), ("blocksize", _I64)]


class Matmul4bit:
    """x @ W^T for one 4-bit `QuantizedTensor` W (N x K on CPU, K a multiple of its blocksize): the
    weight is described to the kernel once, since decoding calls this per layer per token.

    The result is in x's dtype when it is bfloat16 or float32 (else float32), summed in float32. The
    absmax is read as stored: double quantization is undone in the kernel, not in a float32 copy."""

    @staticmethod
    def supports(q) -> bool:
        """Whether the kernel takes this weight: on CPU, rows of whole blocks, power-of-two block sizes."""
        def power_of_two(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        return (q.packed.device.type == "cpu" and len(q.shape) == 2 and q.shape[1] % q.blocksize == 0
                and q.blocksize >= 32 and power_of_two(q.blocksize)
                and (not q.double_quant or power_of_two(q.nested_blocksize)) and kernels() is not None)

    def __init__(self, q):
        # the tensors the descriptor points into, kept alive by this object
        self.q, self.packed = q, q.packed.contiguous()
        self.absmax = q.absmax.contiguous() if q.double_quant else q.absmax.float().contiguous()
        self.nested = q.nested_absmax.contiguous() if q.double_quant else None
        self.n, self.k = q.shape
        self.weight = _Weight4bit(
            self.packed.data_ptr(), None if q.double_quant else self.absmax.data_ptr(),
            self.absmax.data_ptr() if q.double_quant else None, self.nested.data_ptr() if q.double_quant else None,
            dynamic_code().data_ptr() if q.double_quant else None, q.offset or 0.0, q.nested_blocksize,
            code_4bit(q.quant_type).data_ptr(), self.n, self.k, q.blocksize)
        self.weight_ref = ctypes.byref(self.weight)

    def __call__(self, x: torch.Tensor, float32_out: bool = False) -> torch.Tensor:
        """x @ W^T in x's dtype, or in float32 with `float32_out` (a bias or adapter still to be added)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features; the weight takes {self.k}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.k)
        if x2.dtype not in (torch.bfloat16, torch.float32):
            x2 = x2.float()
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], self.n, dtype=torch.float32 if float32_out else x2.dtype)
        kernels().matmul_4bit(x2.data_ptr(), x2.dtype == torch.bfloat16, x2.shape[0], self.weight_ref, out.data_ptr(),
                              float32_out, torch.get_num_threads())
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.n)


def matmul_4bit(x: torch.Tensor, q) -> torch.Tensor:
    """x (..., K) @ W^T for a 4-bit `QuantizedTensor` W; see `Matmul4bit`."""
    return Matmul4bit(q)(x)


def matmul_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight^T (weight N x K), both float32 on CPU, each output summed in an order that does
    not depend on M (for decoding a batch exactly as its rows alone)."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    kernels().matmul_f32(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0], out.data_ptr(),
                         torch.get_num_threads())
    return out


def supports_bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `matmul_bf16` takes x (..., K) @ weight^T: bfloat16 on CPU, at most 8 rows, K % 64 == 0."""
    lib = kernels()
    return (lib is not None and hasattr(lib, "matmul_bf16") and x.dtype == weight.dtype == torch.bfloat16
            and x.device.type == weight.device.type == "cpu" and weight.is_contiguous() and x.shape[-1] == weight.shape[1]
            and weight.shape[1] % 64 == 0 and 0 < x.numel() <= 8 * weight.shape[1])


def matmul_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight^T for bfloat16 tensors, summed in float32 (see `supports_bf16_matmul`)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    kernels().matmul_bf16(x2.data_ptr(), x2.shape[0], k, weight.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
    return out.view(*x.shape[:-1], n)
