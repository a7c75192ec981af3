"""The 4-bit core: NF4 / FP4 blockwise quantization with double quantization. Knows nothing of models."""

from . import ops  # noqa: F401  (defines the nf4tune:: operators, with the reference as their default kernels)
from .codes import bits_per_parameter, code_4bit, dynamic_code, fp4_code, nf4_code
from .tensor import SUPPORTED_BLOCKSIZES, QuantizationError, QuantizedTensor, QuantLayout, quantize

__all__ = [
    "QuantLayout",
    "QuantizationError",
    "QuantizedTensor",
    "SUPPORTED_BLOCKSIZES",
    "bits_per_parameter",
    "code_4bit",
    "dynamic_code",
    "fp4_code",
    "nf4_code",
    "quantize",
]
