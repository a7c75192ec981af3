"""nf4tune: QLoRA fine-tuning in plain PyTorch.

Layers, from the bottom: `nf4tune.quant` (the 4-bit core), `nf4tune.checkpoint` (Hugging Face
checkpoints in and out), `nf4tune.layers` (the 4-bit linear layer and LoRA), `nf4tune.models`
(loading, adapters, merging), and the command line in `nf4tune.cli`.
"""

from .errors import Nf4tuneError
from .lazy import lazy_names

__version__ = "0.1.0"

# The public names load on first use, so `nf4tune --help` and the argument checks answer without
# importing torch (seconds); `from nf4tune import load_model` works as before.
_LAZY = {
    "Linear4bit": ".layers", "Linear16bit": ".layers", "LoraConfig": ".layers",
    "load_adapter": ".models", "load_model": ".models", "save_adapter": ".models",
    "generate": ".serve.generation", "Completion": ".serve.generation",
    "QuantizationError": ".quant", "QuantizedTensor": ".quant", "bits_per_parameter": ".quant", "quantize": ".quant",
}


def _install_fast_paths() -> None:
    from . import dispatch  # noqa: F401  (registers the 4-bit ops' CPU and CUDA kernels)


__getattr__, __dir__ = lazy_names(__name__, _LAZY, before=_install_fast_paths)

__all__ = [
    "Completion",
    "Linear4bit",
    "Linear16bit",
    "LoraConfig",
    "Nf4tuneError",
    "QuantizationError",
    "QuantizedTensor",
    "bits_per_parameter",
    "generate",
    "load_adapter",
    "load_model",
    "quantize",
    "save_adapter",
    "__version__",
]
