"""`QuantizedTensor`: a weight in 4-bit blockwise form, and its bitsandbytes checkpoint layout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..errors import Nf4tuneError
from ..registry import BITSANDBYTES_QUANT_TYPES
from ..registry import BLOCKSIZES as SUPPORTED_BLOCKSIZES  # noqa: E402
from . import blockwise
from .codes import QUANT_TYPES, bits_per_parameter, code_4bit, dynamic_code, on_device

NESTED_BLOCKSIZE = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class QuantizationError(Nf4tuneError, ValueError):
    """A tensor that cannot be quantized or a quantized state that cannot be read."""


@dataclass(frozen=True)
class QuantLayout:
    """How a 4-bit weight is laid out: everything about it but its tensors. Shared by `QuantizedTensor`
    and the layers that hold one's tensors as buffers.

    Attributes:
        shape: the original tensor's shape.
        dtype: the original tensor's dtype (the default dequantization dtype).
        quant_type: "nf4", "fp4" or "int4" (quant.codes.QUANT_TYPES); "none" for an unquantized weight.
        blocksize: elements per absmax block.
        offset: with double quantization (the absmax stored as 8-bit codes of absmax - offset, with a
            nested absmax), the mean subtracted; None without it.
        nested_blocksize: absmax codes per nested scale.
    """

    shape: torch.Size
    dtype: torch.dtype
    quant_type: str = "nf4"
    blocksize: int = 64
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class QuantizedTensor:
    """A tensor stored as packed 4-bit codes plus per-block scales (absmax), laid out as `layout` says.

    With double quantization the float32 absmax values are themselves stored as 8-bit codes of
    (absmax - offset), with one float32 scale per `nested_blocksize` of them.

    Attributes:
        packed: uint8 of shape (ceil(numel / 2), 1), two codes per byte, first in the high nibble.
        absmax: float32 per block, or uint8 codes when double-quantized.
        layout: shape, dtype, quant type, block sizes, double-quantization offset (`QuantLayout`).
        nested_absmax: float32 scale per `nested_blocksize` absmax codes (None without it).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    layout: QuantLayout
    nested_absmax: torch.Tensor | None = None

    shape = property(lambda self: self.layout.shape)
    dtype = property(lambda self: self.layout.dtype)
    quant_type = property(lambda self: self.layout.quant_type)
    blocksize = property(lambda self: self.layout.blocksize)
    double_quant = property(lambda self: self.layout.double_quant)
    offset = property(lambda self: self.layout.offset)
    nested_blocksize = property(lambda self: self.layout.nested_blocksize)
    numel = property(lambda self: self.layout.numel)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes, absmax, nested absmax and offset (code tables excluded,
        they are shared by every tensor)."""
        n = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            n += self.nested_absmax.nbytes + 4
        return n

    @property
    def bits_per_parameter(self) -> float:
        """Nominal storage cost per element (4.127 for NF4 with double quantization at block 64)."""
        return bits_per_parameter(self.blocksize, self.double_quant, self.nested_blocksize)

    def float_absmax(self) -> torch.Tensor:
        """The per-block absmax as float32, undoing double quantization if present."""
        if not self.double_quant:
            return self.absmax
        scales = blockwise.dequantize_8bit(self.absmax, self.nested_absmax, on_device(self.device, dynamic_code),
                                           self.nested_blocksize)
        return scales + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor back in floating point (`dtype`, by default the original dtype), through the
        `nf4tune::dequantize_4bit` op (the device's fastest kernel, the reference's bytes)."""
        return torch.ops.nf4tune.dequantize_4bit(self.packed, self.float_absmax(), list(self.shape), self.quant_type,
                                                 self.blocksize, dtype or self.dtype)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy on `device` (the same object if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        nested = None if self.nested_absmax is None else self.nested_absmax.to(device)
        return QuantizedTensor(self.packed.to(device), self.absmax.to(device), self.layout, nested)

    def quant_state_json(self) -> dict:
        """The non-tensor fields bitsandbytes packs into `quant_state.bitsandbytes__<type>`."""
        state = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.double_quant:
            state.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=self.offset,
            )
        return state

    def bnb_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes writes for this weight into a Hugging Face `*-bnb-4bit`
        checkpoint, under `key` (e.g. "model.layers.0.mlp.up_proj.weight")."""
        # The code tables are cloned: tensors in one state dict must not share memory (safetensors).
        tensors = {
            key: self.packed,
            f"{key}.absmax": self.absmax,
            f"{key}.quant_map": code_4bit(self.quant_type).to(self.device, copy=True),
        }
        if self.double_quant:
            tensors[f"{key}.nested_absmax"] = self.nested_absmax
            tensors[f"{key}.nested_quant_map"] = dynamic_code().to(self.device, copy=True)
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        tensors[f"{key}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_bnb_state_dict(cls, tensors: dict[str, torch.Tensor], key: str) -> "QuantizedTensor":
        """Read the weight stored under `key` in a bitsandbytes 4-bit state dict (inverse of
        `bnb_state_dict`). Extra keys in `tensors` are ignored."""
        state_keys = [k for k in (f"{key}.quant_state.bitsandbytes__{t}" for t in BITSANDBYTES_QUANT_TYPES) if k in tensors]
        if key not in tensors or f"{key}.absmax" not in tensors or not state_keys:
            raise QuantizationError(
                f"{key}: not a bitsandbytes 4-bit weight (expected {key}, {key}.absmax and "
                f"{key}.quant_state.bitsandbytes__nf4 or __fp4 in the checkpoint)."
            )
        try:
            state = json.loads(bytes(tensors[state_keys[0]].to(torch.uint8).cpu().tolist()).decode("utf-8"))
            quant_type, blocksize = state["quant_type"], int(state["blocksize"])
            shape, dtype = torch.Size(state["shape"]), getattr(torch, state["dtype"])
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise QuantizationError(f"{key}: its quant_state cannot be read ({e}); the checkpoint may be corrupt.") from e
        packed = tensors[key]
        if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage may store the bytes as another dtype
            packed = packed.contiguous().view(torch.uint8)
        packed = packed.reshape(-1, 1)
        if packed.numel() != -(-math.prod(shape) // 2):
            raise QuantizationError(f"{key}: {packed.numel()} packed bytes do not hold a {list(shape)} tensor.")
        nested = f"{key}.nested_absmax" in tensors
        layout = QuantLayout(shape, dtype, quant_type, blocksize, float(state["nested_offset"]) if nested else None,
                             int(state.get("nested_blocksize", NESTED_BLOCKSIZE)))
        return cls(packed, tensors[f"{key}.absmax"], layout, tensors[f"{key}.nested_absmax"] if nested else None)


def _check_input(w: torch.Tensor, name: str, quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"cannot quantize {name}: unknown quant_type {quant_type!r}; "
                                f"use one of {', '.join(QUANT_TYPES)}.")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise QuantizationError(
            f"cannot quantize {name}: blocksize {blocksize} is not supported; use a power of two from 32 to 4096."
        )
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"cannot quantize {name}: expected a torch.Tensor, got {type(w).__name__}.")
    if w.dtype not in _FLOAT_DTYPES:
        raise QuantizationError(
            f"cannot quantize {name}: its dtype is {w.dtype}; 4-bit quantization takes float32, float16 or bfloat16."
        )
    if w.numel() == 0:
        raise QuantizationError(f"cannot quantize {name}: it is empty (shape {list(w.shape)}).")


def quantize(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "tensor",
) -> QuantizedTensor:
    """Quantize a float tensor to 4-bit NF4 or FP4, bit-for-bit as bitsandbytes does.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape, on any device.
        quant_type: "nf4" (NormalFloat, the QLoRA default), "fp4" or "int4" (an ablation; see codes.int4_code).
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: also quantize the absmax values (8-bit, blocks of 256): 4.127 instead of 4.5
            bits per parameter at block 64.
        name: how errors refer to the tensor (e.g. its checkpoint key).
    """
    _check_input(w, name, quant_type, blocksize)
    packed, absmax = torch.ops.nf4tune.quantize_4bit(w, quant_type, blocksize)
    # A NaN or Inf anywhere makes its block's absmax NaN or Inf: checking absmax is 64x cheaper.
    if not torch.isfinite(absmax).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QuantizationError(
            f"cannot quantize {name}: it holds {bad} NaN or Inf value(s); the checkpoint is likely corrupt or overflowed."
        )
    if not double_quant:
        return QuantizedTensor(packed, absmax, QuantLayout(w.shape, w.dtype, quant_type, blocksize))
    offset = absmax.mean()
    codes, nested_absmax = blockwise.quantize_8bit(absmax - offset, on_device(w.device, dynamic_code), NESTED_BLOCKSIZE)
    return QuantizedTensor(packed, codes, QuantLayout(w.shape, w.dtype, quant_type, blocksize, offset.item()),
                           nested_absmax)
