"""The AVX-512 CPU kernels of `cpu_kernels.cpp`: built on first use with the system C++ compiler
(the one torch.compile also needs), cached, and called through ctypes.

The kernels: `dequantize_4bit` (bit-exact with `blockwise.dequantize_4bit`), `matmul_4bit` (x @ W^T
with the 4-bit W decoded in registers, for decoding a few tokens at a time), `matmul_f32` (the
adapters' products while decoding), where the CPU has AVX512-BF16 `matmul_bf16` (for the 16-bit
output head), `argmax_rows` (greedy tokens), and `rms_norm` and `decode_attention` for `serve/decoder.py`. Where the CPU
lacks AVX-512, no compiler is found or the build fails, `load()` returns no library (with a warning
for a failed build), with the reason, and `nf4tune.dispatch` keeps the PyTorch paths; it is also
what reads NF4TUNE_NATIVE and decides which inputs come here (the `*_rejects` checks below say
what a kernel cannot take). Every ctypes call of the package is in this module.
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
from . import base

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
def load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library (None where it cannot be had here) and one sentence saying why."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the AVX-512 kernels need an x86-64 CPU (this is {platform.machine()})"
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:  # every AVX-512 CPU since Skylake-SP
        return None, "this CPU lacks AVX-512 (F, BW, VL)"
    compiler = _compiler()
    if compiler is None:
        log.warning("nf4tune: no C++ compiler found; 4-bit CPU inference uses the slower PyTorch path.")
        return None, "no C++ compiler found (set CXX or install g++)"
    target = library_path(compiler, flags)
    try:
        lib = _load(compiler, target)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        first = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
        log.warning("nf4tune: could not build the AVX-512 kernels (%s); using the PyTorch path.", first)
        return None, f"could not build the AVX-512 kernels ({first})"
    lib.dequantize_4bit.argtypes = [_P, _P, _P, _I64, _I64, _P, _INT, _INT]
    if hasattr(lib, "matmul_bf16"):  # built where the CPU has AVX512-BF16
        lib.matmul_bf16.argtypes = [_P, _I64, _I64, _P, _I64, _P, _INT]
    lib.matmul_4bit.argtypes = [_P, _INT, _I64, _P, _P, _INT, _INT]
    lib.matmul_f32.argtypes = [_P, _I64, _I64, _P, _I64, _P, _INT]
    lib.rms_norm.argtypes = [_P, _I64, _I64, _P, _F, _P]
    lib.argmax_rows.argtypes = [_P, _I64, _I64, _P]
    lib.decode_attention.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _F, _P, _INT]
    bf16 = " with AVX512-BF16" if hasattr(lib, "matmul_bf16") else ""
    return lib, f"AVX-512{bf16} kernels built by {Path(compiler).name} ({target})"


def _lib() -> ctypes.CDLL:
    return load()[0]


def has_bf16_matmul() -> bool:
    """Whether the library has `matmul_bf16` (built where the CPU has AVX512-BF16)."""
    lib = load()[0]
    return lib is not None and hasattr(lib, "matmul_bf16")


def dequantize_rejects(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> str | None:
    """Why `dequantize_4bit` cannot take these tensors (on CPU, contiguous, float32 absmax), or None."""
    if packed.device.type != "cpu":
        return f"the tensor is on {packed.device.type}"
    if not (packed.is_contiguous() and absmax.is_contiguous()):
        return "the tensor is not contiguous"
    if absmax.dtype != torch.float32:
        return "its absmax is not float32"
    if blocksize % 32:
        return f"its block size {blocksize} is not a multiple of 32"
    return None


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The first n // blocksize * blocksize values, in `dtype` (bfloat16 rounded in the kernel; other
    dtypes from float32, as the reference does); written into `out` (bfloat16 or float32, contiguous,
    that many values) if given."""
    full = n - n % blocksize
    if out is None:
        out = torch.empty(full, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    code = code.float().contiguous()
    _lib().dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), full, blocksize,
                              out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out if out.dtype == dtype else out.to(dtype)


class _Weight4bit(ctypes.Structure):
    """`Weight4bit` in cpu_kernels.cpp: one 4-bit weight, described once."""

    _fields_ = [("packed", _P), ("absmax_fp32", _P), ("absmax_codes", _P), ("nested", _P), ("dynamic_table", _P),
                ("offset", _F), ("group", _I64), ("code", _P), ("n", _I64), ("k", _I64), ("blocksize", _I64)]


def matmul_rejects(q) -> str | None:
    """Why `Matmul4bit` cannot take this weight (on CPU, rows of whole blocks, power-of-two block
    sizes), or None."""
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if q.packed.device.type != "cpu":
        return f"the weight is on {q.packed.device.type}"
    if len(q.shape) != 2 or q.shape[1] % q.blocksize:
        return "its rows are not whole blocks"
    if q.blocksize < 32 or not power_of_two(q.blocksize) or (q.double_quant and not power_of_two(q.nested_blocksize)):
        return "its block sizes are not powers of two (at least 32)"
    return None


class Matmul4bit(base.Matmul4bit):
    """x @ W^T for one 4-bit `QuantizedTensor` W (N x K on CPU, K a multiple of its blocksize): the
    weight is described to the kernel once, since decoding calls this per layer per token.

    The result is in x's dtype when it is bfloat16 or float32 (else float32), summed in float32. The
    absmax is read as stored: double quantization is undone in the kernel, not in a float32 copy."""

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
        _lib().matmul_4bit(x2.data_ptr(), x2.dtype == torch.bfloat16, x2.shape[0], self.weight_ref, out.data_ptr(),
                              float32_out, torch.get_num_threads())
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.n)

    @staticmethod
    def matmul_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return matmul_f32(x, weight)


def matmul_4bit(x: torch.Tensor, q) -> torch.Tensor:
    """x (..., K) @ W^T for a 4-bit `QuantizedTensor` W; see `Matmul4bit`."""
    return Matmul4bit(q)(x)


def matmul_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight^T (weight N x K), both float32 on CPU, each output summed in an order that does
    not depend on M (for decoding a batch exactly as its rows alone)."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _lib().matmul_f32(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0], out.data_ptr(),
                         torch.get_num_threads())
    return out


def bf16_matmul_rejects(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why `matmul_bf16` cannot take x (..., K) @ weight^T (bfloat16 on CPU, at most 8 rows,
    K % 32 == 0), or None."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"the tensors are on {x.device.type}"
    if not x.dtype == weight.dtype == torch.bfloat16:
        return "the tensors are not bfloat16"
    if not weight.is_contiguous() or x.shape[-1] != weight.shape[1] or weight.shape[1] % 32:
        return "the weight is not contiguous with a multiple of 32 columns"
    if not 0 < x.numel() <= 8 * weight.shape[1]:
        return "it takes 1 to 8 rows"
    return None


def matmul_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight^T for bfloat16 tensors, summed in float32 (see `supports_bf16_matmul`)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    _lib().matmul_bf16(x2.data_ptr(), x2.shape[0], k, weight.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
    return out.view(*x.shape[:-1], n)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of a contiguous float32 CPU tensor (..., N): the first maximum of each row, or its
    first NaN; int64."""
    out = torch.empty(x.shape[:-1], dtype=torch.int64)
    _lib().argmax_rows(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of the float32 rows x (M, K; K % 16 == 0) times the float32 weight, into bfloat16 `out`."""
    m, k = x.shape
    if out is None:
        out = torch.empty(m, k, dtype=torch.bfloat16)
    _lib().rms_norm(x.data_ptr(), m, k, weight.data_ptr(), eps, out.data_ptr())
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, starts: torch.Tensor, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """One decoding step's attention for B rows: rotary on q and k (bfloat16, (B, heads * D) and
    (B, kv_heads * D); cos / sin float32 (B, D)), k and v written into the caches (bfloat16,
    (B, kv_heads, capacity, D)) at `slot`, and each row attending to its slots starts[b] .. slot
    (int64), into bfloat16 `out` (B, heads * D)."""
    batch, kv_heads, capacity, head_dim = k_cache.shape
    heads = q.shape[1] // head_dim
    _lib().decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                            k_cache.data_ptr(), v_cache.data_ptr(), capacity, slot, starts.data_ptr(), batch, heads,
                            kv_heads, head_dim, scale, out.data_ptr(), torch.get_num_threads())
    return out


@functools.lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """GNU's OpenMP runtime as this process loaded it (PyTorch's Linux wheels bundle libgomp; the same library,
    not a second copy), or None where it is not loaded or /proc cannot say. (LLVM's and Intel's runtimes pause
    every thread's team at once, not the caller's: they are left alone.)"""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode, path
        path = fields[5] if len(fields) == 6 else ""
        if os.path.basename(path).startswith("libgomp") and ".so" in path:
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def release_openmp_team() -> bool:
    """Let the calling thread's team of OpenMP threads go (libgomp's `omp_pause_resource_all`, OpenMP 5.0;
    the thread's next parallel region makes a new one). True where the runtime did.

    Why: a team lives as long as its thread, idle or not. While the main thread keeps the one it made
    loading a model, there are more OpenMP threads than CPUs once another thread decodes, and libgomp
    then wakes a team's threads the slow way at every parallel region: a small 4-bit matmul took 2.5x
    its time on an engine's worker thread (BENCHMARKS.md)."""
    runtime = _openmp_runtime()
    pause = getattr(runtime, "omp_pause_resource_all", None)
    if pause is None:
        return False
    pause.argtypes, pause.restype = [_INT], _INT
    return pause(1) == 0  # omp_pause_soft
