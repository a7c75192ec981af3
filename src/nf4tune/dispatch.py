"""The one place that chooses, per operation and input, between the PyTorch reference and a fast path.

Operations (`OPS`): 4-bit `quantize_4bit` and `dequantize_4bit`, the fused few-token `matmul_4bit`,
`rms_norm` and `decode_attention` (the CPU decoder's), `head_matmul` (the bf16 output head while
decoding), `loss` (the chunked cross-entropy's compiled kernels), `train_compile` (whether training's
`compile: auto` compiles the decoder layers) and `decode` (which decoder the serving engine runs a
model with). Paths:

- `native-cpu`: the AVX-512 kernels of `kernels.cpu` (built on first use; NF4TUNE_NATIVE=0: off);
- `triton`: the Triton kernels of `kernels.cuda` (after their first-use check on each GPU);
- `torch.compile`: `kernels.compiled_4bit` / `Compiled`, on CPU for inputs of at least
  `COMPILE_MIN_NUMEL` elements (below, compiling costs more than it saves; NF4TUNE_COMPILE=0: off);
- `reference`: plain PyTorch (`quant.blockwise` and friends), which the tests hold every other
  path to (byte for byte where the path promises it).

`decode`'s paths: `static-graphs` / `static-compiled` / `static-eager` (`serve.static_decoder`, its
step captured in a CUDA graph, compiled, or as written, the mode also in `Path.static_mode`: the
default on CUDA, graphs unless NF4TUNE_COMPILE=0), `native-cpu` (`serve.decoder.Decoder`, the default on CPU with the AVX-512
kernels) and `reference` (transformers' `generate`). NF4TUNE_STATIC_DECODER=0 keeps the static
decoder off; =eager / compiled / graphs asks for it in that mode on any device (graphs on CUDA only).
The engine falls back (saying why) where a model or its adapters need another decoder.

`path(op, *inputs)` says which path an input takes and why; every function here runs exactly the
path it names. This module is the only reader of NF4TUNE_NATIVE / NF4TUNE_COMPILE /
NF4TUNE_STATIC_DECODER / NF4TUNE_TRAIN_MATMUL and the only caller of the kernels' capability checks.

The 4-bit operations are `torch.library` custom ops (`quant.ops`, the reference their default kernel);
this module registers their "cpu" and "cuda" kernels, which run the path `path()` names, and PyTorch's
dispatcher routes each call by device. No other module's globals are touched, so the order in which
modules are imported changes nothing: the package's public names, layers, loaders and commands import
this module; a program importing `nf4tune.quant` alone runs the default (reference) kernels, same bytes.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import Nf4tuneError
from .kernels import base, compiled, compiled_4bit, gemm
from .kernels import cpu as native
from .kernels import cuda as cuda_kernels
from .quant import blockwise, ops, tensor
from .quant.codes import code_4bit, on_device

NATIVE_ENV, COMPILE_ENV, STATIC_DECODER_ENV = "NF4TUNE_NATIVE", "NF4TUNE_COMPILE", "NF4TUNE_STATIC_DECODER"
TRAIN_MATMUL_ENV = "NF4TUNE_TRAIN_MATMUL"
REFERENCE, NATIVE, TRITON, COMPILED = "reference", "native-cpu", "triton", "torch.compile"
STATIC = "static-"  # decode's static-decoder paths: STATIC + one of STATIC_MODES
STATIC_MODES = ("eager", "compiled", "graphs")
OPS = ("quantize_4bit", "dequantize_4bit", "matmul_4bit", "rms_norm", "decode_attention", "head_matmul", "argmax",
       "loss", "train_compile", "decode")
# Below this many elements compilation costs more than it saves.
COMPILE_MIN_NUMEL = 1 << 20
# Up to this many tokens a layer multiplies through its 4-bit weight directly (the fused kernels); beyond,
# dequantizing once and the BLAS matmul is faster (BENCHMARKS.md).
FUSED_MAX_TOKENS = 16

Matmul4bit = base.Matmul4bit  # what `fused_matmul_4bit` returns, whichever device's


@dataclass(frozen=True)
class Path:
    """Which implementation an operation takes (`name`) and one sentence saying why (`reason`); for
    `decode`, `static_mode` is the static decoder's mode ("eager", "compiled", "graphs") where it is
    the one chosen, else None."""

    name: str
    reason: str
    static_mode: str | None = None

    @property
    def fast(self) -> bool:
        return self.name != REFERENCE


# ---- what this machine has (each read once per process) ----

@functools.cache
def native_library() -> tuple[object | None, str]:
    """The AVX-512 library (None where it cannot be had) and why."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None, f"{NATIVE_ENV}=0 turns the AVX-512 kernels off"
    return native.load()


def _native_reason() -> str | None:
    """None where the AVX-512 kernels are loaded, else why not."""
    lib, reason = native_library()
    return None if lib is not None else reason


def _compile_off() -> str | None:
    """Why torch.compile is off in this process, or None."""
    if os.environ.get(COMPILE_ENV, "1") == "0":
        return f"{COMPILE_ENV}=0 turns torch.compile off"
    if compiled.broken:
        return f"torch.compile failed earlier in this process ({compiled.broken_reason})"
    return None


def _compile_reason(t: torch.Tensor, numel: int) -> str | None:
    """None where work of `numel` elements on t's device should be compiled, else why not."""
    off = _compile_off()
    if off:
        return off
    if t.device.type != "cpu":
        return f"torch.compile serves CPU tensors only here (this is {t.device.type})"
    if numel < COMPILE_MIN_NUMEL:
        return f"{numel} elements: below {COMPILE_MIN_NUMEL}, compiling costs more than it saves"
    return None


def _triton_reason(device: torch.device) -> str | None:
    return cuda_kernels.check(device)


# ---- the capability API ----

def path(op: str, *inputs) -> Path:
    """Which path `op` takes for these inputs, and why. Inputs per op:
    quantize_4bit (w, quant_type, blocksize); dequantize_4bit (q) or (packed, absmax, n, blocksize);
    matmul_4bit (q) or (q, x: the input, whose token count counts); rms_norm (x); decode_attention (x);
    head_matmul (x, weight); loss (logits); train_compile (the model's torch.device); decode (a tensor
    on the model's device)."""
    if op not in _PATHS:
        raise ValueError(f"unknown operation {op!r}: one of {', '.join(OPS)}")
    return _PATHS[op](*inputs)


def _quantize_path(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> Path:
    full = w.numel() - w.numel() % blocksize
    reason = _compile_reason(w, full)
    if reason is None:
        return Path(COMPILED, "Inductor fuses the reference's passes into one vectorized loop")
    return Path(REFERENCE, reason)


def _dequantize_path(packed, absmax=None, n: int | None = None, blocksize: int | None = None) -> Path:
    if absmax is None:  # a QuantizedTensor
        q = packed
        packed, absmax, n, blocksize = q.packed.reshape(-1), q.float_absmax(), math.prod(q.shape), q.blocksize
    full = n - n % blocksize
    if packed.is_cuda:
        reason = _triton_reason(packed.device)
        return Path(TRITON, "the Triton kernel passed its first-use check") if reason is None else Path(REFERENCE, reason)
    if packed.device.type != "cpu":
        return Path(REFERENCE, f"no fast path on {packed.device.type}")
    native_reason = _native_reason()
    if native_reason is None and full:
        rejects = native.dequantize_rejects(packed, absmax, blocksize)
        if rejects is None:
            return Path(NATIVE, native_library()[1])
        native_reason = rejects
    compile_reason = _compile_reason(packed, full)
    if compile_reason is None:
        return Path(COMPILED, f"no AVX-512 kernel: {native_reason}")
    return Path(REFERENCE, f"{native_reason}; {compile_reason}")


def _tokens_reason(x: torch.Tensor, k: int) -> str | None:
    """None where x (..., k) is few enough tokens for the fused kernels, else why not."""
    if x.numel() > FUSED_MAX_TOKENS * k:
        return (f"{x.numel() // k} tokens: above {FUSED_MAX_TOKENS}, dequantizing once and the BLAS matmul "
                "is faster")
    return None


def fuses(x: torch.Tensor, k: int) -> bool:
    """Whether x (..., k) goes through a fused kernel (`path("matmul_4bit", q, x)`'s token rule, without
    the weight's checks: for a layer that already holds its prepared kernel)."""
    return _tokens_reason(x, k) is None


def _matmul_path(q, x: torch.Tensor | None = None) -> Path:
    tokens = None if x is None else _tokens_reason(x, q.shape[-1])
    if tokens is not None:
        return Path(REFERENCE, tokens)
    if q.packed.is_cuda:
        reason = _triton_reason(q.packed.device)
        return Path(TRITON, "the Triton kernel passed its first-use check") if reason is None else Path(REFERENCE, reason)
    reason = _native_reason() or native.matmul_rejects(q)
    return Path(NATIVE, native_library()[1]) if reason is None else Path(REFERENCE, reason)


def _cpu_kernel_path(x: torch.Tensor) -> Path:
    if x.device.type != "cpu":
        return Path(REFERENCE, f"no fast kernel on {x.device.type}")
    reason = _native_reason()
    return Path(NATIVE, native_library()[1]) if reason is None else Path(REFERENCE, reason)


def _argmax_path(x: torch.Tensor) -> Path:
    if x.dtype != torch.float32:
        return Path(REFERENCE, f"the kernel takes float32 scores, not {x.dtype}")
    return _cpu_kernel_path(x)


def _head_path(x: torch.Tensor, weight: torch.Tensor) -> Path:
    reason = _native_reason() or native.bf16_matmul_rejects(x, weight)
    if reason is None and not native.has_bf16_matmul():
        reason = "this CPU lacks AVX512-BF16"
    return Path(NATIVE, native_library()[1]) if reason is None else Path(REFERENCE, reason)


def _loss_path(t: torch.Tensor) -> Path:
    reason = _compile_reason(t, t.numel())
    return Path(COMPILED, "Inductor fuses the loss's passes over the logits") if reason is None else Path(REFERENCE, reason)


def _train_compile_path(device: torch.device) -> Path:
    off = _compile_off()
    if off:
        return Path(REFERENCE, off)
    if device.type != "cuda":
        return Path(REFERENCE, f"on {device.type} compiling the decoder layers costs more than it saves")
    return Path(COMPILED, "Inductor fuses each decoder layer's norms, rotary, SwiGLU and casts around the 4-bit ops")


def _decode_path(x: torch.Tensor) -> Path:
    """Which decoder serves a 4-bit Llama-family model on x's device (the engine falls back, saying why,
    for a model or adapters that decoder cannot run)."""
    setting = os.environ.get(STATIC_DECODER_ENV, "").strip().lower()
    if setting not in ("", "auto", "0", "1") + STATIC_MODES:
        raise Nf4tuneError(f"{STATIC_DECODER_ENV}={setting!r}: use 0 (off), 1 (the default) or one of "
                           f"{', '.join(STATIC_MODES)}.")
    cuda = x.device.type == "cuda"
    if setting in STATIC_MODES:
        mode, why = setting, f"{STATIC_DECODER_ENV}={setting}"
        if mode == "graphs" and not cuda:
            mode, why = "compiled", f"{why}, but CUDA graphs need a GPU: the compiled step"
    elif cuda and setting != "0":
        mode, why = "graphs", "the static-cache decoder, its compiled step replayed as a CUDA graph"
    else:
        mode = None
    if mode is not None:
        off = _compile_off() if mode != "eager" else None
        if off:
            mode, why = "eager", f"{why}; uncompiled: {off}"
        return Path(STATIC + mode, why, static_mode=mode)
    off = f"{STATIC_DECODER_ENV}=0; " if cuda else ""
    if x.device.type == "cpu":
        reason = _native_reason()
        if reason is None:
            return Path(NATIVE, "the CPU decoder (serve.decoder) with the AVX-512 kernels")
        return Path(REFERENCE, f"transformers' generate: the CPU decoder needs the AVX-512 kernels ({reason})")
    return Path(REFERENCE, f"{off}transformers' generate (no fast decoder on {x.device.type})")


_PATHS: dict[str, Callable[..., Path]] = {
    "quantize_4bit": _quantize_path, "dequantize_4bit": _dequantize_path, "matmul_4bit": _matmul_path,
    "rms_norm": _cpu_kernel_path, "decode_attention": _cpu_kernel_path, "head_matmul": _head_path, "argmax": _argmax_path,
    "loss": _loss_path, "train_compile": _train_compile_path, "decode": _decode_path,
}


# ---- the operations ----

def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`blockwise.quantize_4bit`, byte for byte, on the fastest path for w."""
    n = w.numel()
    full = n - n % blocksize
    if not _quantize_path(w, quant_type, blocksize).fast:
        return blockwise.quantize_4bit(w, quant_type, blocksize)
    flat = w.reshape(-1)
    head = compiled_4bit.quantize_4bit(flat[:full], quant_type, blocksize)
    if head is None:
        return blockwise.quantize_4bit(w, quant_type, blocksize)
    packed, absmax = head
    if full < n:  # a partial last block: the reference handles its quirks
        tail_packed, tail_absmax = blockwise.quantize_4bit(flat[full:], quant_type, blocksize)
        packed, absmax = torch.cat([packed, tail_packed]), torch.cat([absmax, tail_absmax])
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], quant_type: str,
                    blocksize: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`blockwise.dequantize_4bit` (float32 absmax), bit for bit, on the fastest path for these tensors.
    With `out` (a contiguous buffer of at least that many values of `dtype`), the kernels that can
    write there do: the result is then a view of it (use the returned tensor either way)."""
    n = math.prod(shape)
    full = n - n % blocksize
    flat = packed.reshape(-1)
    chosen = _dequantize_path(flat, absmax, n, blocksize).name
    into = out[:n] if out is not None and out.dtype == dtype and out.device == packed.device else None
    if chosen == TRITON:
        code = on_device(packed.device, code_4bit, quant_type)
        return cuda_kernels.dequantize_4bit(flat, absmax, code, n, blocksize, dtype, into).view(shape)
    head = None
    if chosen == NATIVE:
        if into is not None and full == n and dtype in (torch.bfloat16, torch.float32):
            return native.dequantize_4bit(flat, absmax, code_4bit(quant_type), n, blocksize, dtype, into).view(shape)
        head = native.dequantize_4bit(flat, absmax, code_4bit(quant_type), n, blocksize, dtype)
    elif chosen == COMPILED:
        head = compiled_4bit.dequantize_4bit(flat, absmax, full, quant_type, blocksize, dtype)
    if head is None:
        return blockwise.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype)
    if full < n:
        tail = blockwise.dequantize_4bit(flat[full // 2:], absmax[full // blocksize:], (n - full,), quant_type,
                                         blocksize, dtype)
        head = torch.cat([head, tail])
    return head.view(shape)


_scratch = threading.local()


def dequantize_scratch(q, dtype: torch.dtype) -> torch.Tensor:
    """q dequantized to `dtype` into a buffer this thread reuses for every weight on q's device, so a
    training step does not allocate (and on CPU page-fault) a fresh weight-sized tensor per layer per
    pass. The result is valid until this thread's next call: for a weight used at once and dropped."""
    buffer = _scratch_buffer(q.device, dtype, math.prod(q.shape))
    return dequantize_4bit(q.packed, q.float_absmax(), q.shape, q.quant_type, q.blocksize, dtype, out=buffer)


def scratch_decoder(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, dtype: torch.dtype):
    """For decoding many same-sized 4-bit tensors in a row (a MoE layer's experts): a function
    (packed, absmax, shape) -> the tensor dequantized to `dtype` into this thread's reused buffer, as
    `dequantize_scratch` (valid until the next call), its path chosen once from these sample tensors (of
    the same device, dtype and layout as those it will be given; float32 absmax) rather than per call."""
    n = packed.numel() * 2
    if _dequantize_path(packed.reshape(-1), absmax, n, blocksize).name != NATIVE or dtype not in (
            torch.bfloat16, torch.float32) or n % blocksize:
        return lambda p, a, shape: dequantize_4bit(p, a, shape, quant_type, blocksize, dtype,
                                                   out=_scratch_buffer(p.device, dtype, math.prod(shape)))
    code = code_4bit(quant_type).float().contiguous()
    threads = torch.get_num_threads()
    lib = native._lib()
    out_bf16 = int(dtype == torch.bfloat16)

    def decode(p: torch.Tensor, a: torch.Tensor, shape) -> torch.Tensor:
        numel = math.prod(shape)
        out = _scratch_buffer(p.device, dtype, numel)
        lib.dequantize_4bit(p.data_ptr(), a.data_ptr(), code.data_ptr(), numel, blocksize, out.data_ptr(), out_bf16,
                            threads)
        return out[:numel].view(shape)

    return decode


def _scratch_buffer(device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
    """This thread's reused buffer of at least n values of `dtype` on `device` (`dequantize_scratch`'s)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((device, dtype))
    if buffer is None or buffer.numel() < n:
        buffer = buffers[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
    return buffer


def training_matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the frozen weights' training products with `x` run in (the 4-bit layers' forward and
    input gradient, the loss's head): float32 for bfloat16 on a CPU whose float32 GEMM is the faster
    (measured once, `kernels.gemm`: without AMX, oneDNN's bf16 GEMM ran at half float32's speed,
    BENCHMARKS.md "The step at 1.5x"); else x's own. Callers round the result back to x's dtype.
    NF4TUNE_TRAIN_MATMUL=bfloat16 / float32 sets it for bfloat16 CPU tensors."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return x.dtype
    setting = os.environ.get(TRAIN_MATMUL_ENV, "auto")
    if setting not in ("auto", "bfloat16", "float32"):
        raise Nf4tuneError(f"{TRAIN_MATMUL_ENV}={setting!r}: use auto (the default), bfloat16 or float32.")
    if setting == "auto":
        return torch.float32 if gemm.float32_gemm_faster() else x.dtype
    return getattr(torch, setting)


def training_attention_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype training's attention on CPU computes in (its score and value products, forward and
    backward): `training_matmul_dtype`'s choice, for the same reason. PyTorch's CPU flash-attention kernel
    runs its bfloat16 products through the same oneDNN GEMM that the probe times (`kernels.gemm`): on a CPU
    without AMX, one layer's causal attention forward and backward took 1.3-1.7x the CPU time in bfloat16 at
    8192 tokens, 1.9x at 16384, that it took with the inputs converted to float32 (BENCHMARKS.md "Long
    context"). Callers convert q, k
    and v, and round the output and the gradients back to q's dtype. NF4TUNE_TRAIN_MATMUL sets it too."""
    return training_matmul_dtype(q)


matmul_in = gemm.matmul_in  # x @ m in x's dtype, computed in m's (`training_matmul_dtype`'s choice)


def fused_matmul_4bit(q) -> Matmul4bit | None:
    """A prepared x @ W^T for the 4-bit weight q with W decoded on the fly (few tokens at a time),
    CPU and CUDA alike (`Matmul4bit`), or None where q's device has none."""
    chosen = _matmul_path(q).name
    if chosen == TRITON:
        return cuda_kernels.Matmul4bit(q)
    if chosen == NATIVE:
        return native.Matmul4bit(q)
    return None


def matmul_4bit(x: torch.Tensor, q) -> torch.Tensor:
    """x (..., K) @ W^T for the 4-bit weight q, in x's dtype: the fused kernel where there is one,
    else through the dequantized weight."""
    fused = fused_matmul_4bit(q)
    if fused is not None:
        return fused(x)
    return x @ q.dequantize(x.dtype).t()


def release_cpu_threads() -> bool:
    """Let the calling thread's OpenMP team go before another thread takes over the CPU work (an engine's
    worker thread): two teams on a CPU of few cores slow each other's parallel regions 2.5x
    (`kernels.cpu.release_openmp_team`). True where the OpenMP runtime did."""
    return native.release_openmp_team()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of float32 rows x (M, K) times the float32 weight, in bfloat16 (into `out` if given)."""
    if x.device.type == "cpu" and native_library()[0] is not None:
        return native.rms_norm(x, weight, eps, out)
    y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.bfloat16)
    if out is None:
        return y
    out.copy_(y)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, starts: torch.Tensor, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """One decoding step's rotary + KV-cache write + attention (see `kernels.cpu.decode_attention`).
    Only the AVX-512 kernel has it: callers check `path("decode_attention", q)` first."""
    p = _cpu_kernel_path(q)
    if not p.fast:
        raise RuntimeError(f"decode attention has no kernel here: {p.reason}")
    return native.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, starts, scale, out)


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight^T for the bf16 output head: the AVX-512-BF16 kernel for a few rows on CPU
    (3x PyTorch's bf16 matrix-vector product, BENCHMARKS.md), else `F.linear`."""
    if _head_path(x, weight).fast:
        return native.matmul_bf16(x, weight)
    return F.linear(x, weight)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) (the first maximum of each row; a row's first NaN where it has one): the AVX-512
    kernel for float32 scores on CPU, 4-5x PyTorch's for a vocabulary's logits (a greedy token's draw)."""
    if _argmax_path(x).fast:
        return native.argmax_rows(x.contiguous())
    return x.argmax(-1)


def decode_matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested,
                       layout: tensor.QuantLayout) -> torch.Tensor:
    """`matmul_4bit` as the `nf4tune::matmul_4bit` custom op: opaque to `torch.compile` and captured
    whole by a CUDA graph (`serve.static_decoder`); `layout` the layer's `QuantLayout`."""
    return ops.matmul_4bit(x, packed, absmax, nested, float(layout.offset or 0.0), list(layout.shape),
                           layout.quant_type, layout.blocksize, layout.nested_blocksize)


class Compiled:
    """`fn`, compiled on first use where `path("loss", first argument)` says so, else `fn` itself."""

    def __init__(self, fn: Callable, dynamic: bool = True):
        self.fn, self.dynamic, self._compiled = fn, dynamic, None

    def __call__(self, *args):
        if not _loss_path(args[0]).fast:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=self.dynamic)
        return compiled.run(self._compiled, self.fn, *args)


# ---- what `nf4tune doctor` prints ----

def _probes(device: torch.device) -> dict[str, tuple[str, tuple]]:
    """Per op, a typical input on `device` (a 7B-class layer's shapes; no values computed) and its description."""
    rows, cols = 4096, 4096
    n = rows * cols
    q = tensor.QuantizedTensor(
        torch.zeros(n // 2, 1, dtype=torch.uint8, device=device), torch.zeros(n // 64, dtype=torch.uint8, device=device),
        tensor.QuantLayout(torch.Size((rows, cols)), torch.bfloat16, "nf4", 64, 0.0, 256),
        torch.ones(n // 64 // 256, dtype=torch.float32, device=device))
    one = torch.zeros(1, device=device)
    return {
        "quantize_4bit": ("a 4096x4096 bf16 weight", (one.to(torch.bfloat16).expand(rows, cols), "nf4", 64)),
        "dequantize_4bit": ("a 4096x4096 NF4 weight", (q,)),
        "matmul_4bit": (f"a 4096x4096 NF4 weight, {FUSED_MAX_TOKENS} tokens",
                        (q, torch.zeros(FUSED_MAX_TOKENS, cols, dtype=torch.bfloat16, device=device))),
        "rms_norm": ("decoding rows of 4096", (one.expand(1, cols),)),
        "decode_attention": ("one decoding step", (one.expand(1, cols),)),
        "head_matmul": ("1 row x a bf16 head of 4096 columns",
                        (torch.zeros(1, cols, dtype=torch.bfloat16, device=device),
                         torch.zeros(8, cols, dtype=torch.bfloat16, device=device))),
        "argmax": ("a greedy token: 32000 float32 scores", (one.expand(32000),)),
        "loss": ("a 2048-token chunk of 32000 logits", (one.expand(2048, 32000),)),
        "train_compile": ("training's decoder layers, compile: auto", (torch.device(device),)),
        "decode": ("serving a 4-bit Llama-family model", (one,)),
    }


def report() -> dict:
    """The environment and, for the CPU and each CUDA device, the path each op takes and why."""
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           NATIVE_ENV: os.environ.get(NATIVE_ENV), COMPILE_ENV: os.environ.get(COMPILE_ENV),
           STATIC_DECODER_ENV: os.environ.get(STATIC_DECODER_ENV),
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    paths = []
    for device in devices:
        for op, (what, inputs) in _probes(device).items():
            chosen = path(op, *inputs)
            paths.append({"device": str(device), "op": op, "input": what, "path": chosen.name, "reason": chosen.reason})
    return {"environment": env, "paths": paths}


def format_report(report: dict) -> str:
    """`report()` as the text `nf4tune doctor` prints."""
    env = report["environment"]
    lines = [f"torch {env['torch']}, triton {env['triton'] or 'not installed'}, CUDA {env['cuda'] or 'none'}; "
             f"GPUs: {', '.join(env['gpus']) or 'none'}",
             f"{NATIVE_ENV}={env[NATIVE_ENV] or '(unset)'}, {COMPILE_ENV}={env[COMPILE_ENV] or '(unset)'}, "
             f"{STATIC_DECODER_ENV}={env.get(STATIC_DECODER_ENV) or '(unset)'}", ""]
    width = max(len(p["op"]) for p in report["paths"])
    device = None
    for p in report["paths"]:
        if p["device"] != device:
            device = p["device"]
            lines.append(f"{device}:")
        lines.append(f"  {p['op']:<{width}}  {p['path']:<15}  {p['reason']}  [{p['input']}]")
    return "\n".join(lines)


# ---- the custom ops' kernels on CPU and CUDA (their default, for other devices, is the reference) ----

def _scratch_dense(w, dtype: torch.dtype) -> torch.Tensor:
    """A frozen weight in `dtype`, used at once and dropped: a 4-bit one dequantized into the reused
    buffer (`dequantize_scratch`), a dense one (Linear16bit) as it is."""
    if isinstance(w, torch.Tensor):
        return w if w.dtype == dtype else w.to(dtype)
    return dequantize_scratch(w, dtype)


def _frozen_product(x: torch.Tensor, w, transposed: bool) -> torch.Tensor:
    """x W^T (transposed) or x W for a frozen weight, in x's dtype: W made dense by `_scratch_dense` in the
    dtype `training_matmul_dtype` chooses (float32 for bfloat16 x where this CPU's float32 GEMM is the
    faster), x converted a block of rows at a time (`matmul_in`)."""
    dtype = training_matmul_dtype(x)
    dense = _scratch_dense(w, dtype)
    return matmul_in(x, dense.t() if transposed else dense, dtype)


_DEVICES = ("cpu", "cuda")
ops.quantize_4bit.register_kernel("cpu", quantize_4bit)
ops.dequantize_4bit.register_kernel(_DEVICES, dequantize_4bit)
ops.matmul_4bit.register_kernel(_DEVICES, lambda x, *weight: matmul_4bit(x, ops.weight_of(*weight)))
ops.lora_linear_4bit.register_kernel(_DEVICES, functools.partial(ops.lora_linear, _frozen_product))
ops.grad_input_4bit.register_kernel(_DEVICES, functools.partial(ops.grad_input, _frozen_product))


def quant_type_paths() -> dict[str, str]:
    """Per `quant.quant_type`, which of the ops above the frozen linear layers take: the 4-bit types all
    take the 4-bit ops (their code table is the kernels' input, not a different path); none takes none."""
    from .registry import QUANT_TYPES, UNQUANTIZED

    four_bit = "quantize_4bit on load, then dequantize_4bit (training, prefill) and matmul_4bit (a few tokens)"
    return {**{t: four_bit for t in QUANT_TYPES},
            UNQUANTIZED: "no 4-bit op: the weight stays in the compute dtype and torch's own matmul runs it; "
                         "the other ops as listed"}
