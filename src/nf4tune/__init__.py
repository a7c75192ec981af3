"""nf4tune: QLoRA fine-tuning in plain PyTorch.

Layers, from the bottom: `nf4tune.quant` (the 4-bit core), `nf4tune.checkpoint` (Hugging Face
checkpoints in and out), and the command line in `nf4tune.cli`.
"""

from .errors import Nf4tuneError
from .quant import QuantizationError, QuantizedTensor, bits_per_parameter, quantize

__version__ = "0.1.0"
__all__ = ["Nf4tuneError", "QuantizationError", "QuantizedTensor", "bits_per_parameter", "quantize", "__version__"]
