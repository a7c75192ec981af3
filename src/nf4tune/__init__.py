"""nf4tune: QLoRA fine-tuning in plain PyTorch.

Layers, from the bottom: `nf4tune.quant` (the 4-bit core), `nf4tune.checkpoint` (Hugging Face
checkpoints in and out), `nf4tune.layers` (the 4-bit linear layer and LoRA), `nf4tune.models`
(loading, adapters, merging), and the command line in `nf4tune.cli`.
"""

from . import dispatch  # noqa: F401  (installs the fast 4-bit paths into quant)
from .errors import Nf4tuneError
from .layers import Linear4bit, LoraConfig
from .models import load_adapter, load_model, save_adapter
from .quant import QuantizationError, QuantizedTensor, bits_per_parameter, quantize

__version__ = "0.1.0"
__all__ = [
    "Linear4bit",
    "LoraConfig",
    "Nf4tuneError",
    "QuantizationError",
    "QuantizedTensor",
    "bits_per_parameter",
    "load_adapter",
    "load_model",
    "quantize",
    "save_adapter",
    "__version__",
]
