"""The 4-bit operations as `torch.library` custom ops in the `nf4tune` namespace, each with this
package's plain-PyTorch reference as its default kernel.

`nf4tune.dispatch` registers the per-device kernels ("cpu", "cuda") that pick a fast path; PyTorch's
dispatcher then routes each call by device, so no module swaps another's functions. To torch.compile
each op is one opaque node (`register_fake` gives its output's shape), so a decoder layer traces
without a graph break while the 4-bit weight never leaves the op. `lora_linear_4bit` carries the
package's one autograd path for a frozen 4-bit (or 16-bit) weight with a LoRA adapter.

A weight travels as its tensors plus its layout's fields (the ops' schemas take no dataclass):
`weight` the packed codes (or, with quant_type "none", the dense weight itself), `absmax`, `nested`
and `offset` (the double-quantization offset as a 0-dim CPU tensor: as a float it would be a constant
of a compiled graph, and every decoder layer would compile again; on the CPU reading it needs no sync).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..registry import UNQUANTIZED
from . import blockwise
from .tensor import QuantizedTensor, QuantLayout


@torch.library.custom_op("nf4tune::quantize_4bit", mutates_args=())
def quantize_4bit(w: Tensor, quant_type: str, blocksize: int) -> tuple[Tensor, Tensor]:
    """(packed codes, float32 absmax) of w, bitsandbytes' bytes (`blockwise.quantize_4bit`)."""
    return blockwise.quantize_4bit(w, quant_type, blocksize)


@quantize_4bit.register_fake
def _(w, quant_type, blocksize):
    n = w.numel()
    return w.new_empty((n + 1) // 2, 1, dtype=torch.uint8), w.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("nf4tune::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, shape: list[int], quant_type: str, blocksize: int,
                    dtype: torch.dtype) -> Tensor:
    """The 4-bit tensor of these codes and float32 absmax, in `dtype` (`blockwise.dequantize_4bit`)."""
    return blockwise.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, shape, quant_type, blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


def weight_of(weight: Tensor, absmax: Optional[Tensor], nested: Optional[Tensor], offset: Tensor | float | None,
              shape: list[int], quant_type: str, blocksize: int, nested_blocksize: int) -> QuantizedTensor | Tensor:
    """The ops' weight arguments as a `QuantizedTensor` (or the dense weight, quant_type "none")."""
    if quant_type == UNQUANTIZED:
        return weight
    layout = QuantLayout(torch.Size(shape), torch.bfloat16, quant_type, blocksize,
                         float(offset) if nested is not None else None, nested_blocksize)
    return QuantizedTensor(weight, absmax, layout, nested)


def fresh_dense(w: QuantizedTensor | Tensor, dtype: torch.dtype) -> Tensor:
    """The weight in `dtype` as a new tensor (what the default kernels use; dispatch's reuse a buffer)."""
    return w.to(dtype) if isinstance(w, Tensor) else w.dequantize(dtype)


def fresh_product(x: Tensor, w: QuantizedTensor | Tensor, transposed: bool) -> Tensor:
    """x W^T (transposed) or x W for the frozen weight w, in x's dtype, w made dense as a new tensor (the
    default kernels' product; dispatch's reuse a buffer and may compute in another dtype)."""
    dense = fresh_dense(w, x.dtype)
    return x @ (dense.t() if transposed else dense)


@torch.library.custom_op("nf4tune::matmul_4bit", mutates_args=())
def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, nested: Optional[Tensor], offset: float, shape: list[int],
                quant_type: str, blocksize: int, nested_blocksize: int) -> Tensor:
    """x @ W^T for the 4-bit weight W, in x's dtype (the fused few-token kernels where a device has them).
    `offset` a float: the static decoder compiles one graph for the whole model anyway."""
    w = weight_of(packed, absmax, nested, offset, shape, quant_type, blocksize, nested_blocksize)
    return x @ w.dequantize(x.dtype).t()


@matmul_4bit.register_fake
def _(x, packed, absmax, nested, offset, shape, quant_type, blocksize, nested_blocksize):
    return x.new_empty(*x.shape[:-1], shape[0])


def lora_linear(frozen_product: Callable, x: Tensor, x_lora: Optional[Tensor], lora_A: Optional[Tensor],
                lora_B: Optional[Tensor], scaling: float, bias: Optional[Tensor], kept: Optional[Tensor],
                weight: Tensor, absmax: Optional[Tensor], nested: Optional[Tensor], offset: Optional[Tensor],
                shape: list[int], quant_type: str, blocksize: int, nested_blocksize: int) -> Tensor:
    """`lora_linear_4bit`'s forward with x W^T computed by `frozen_product(x, w, transposed=True)`."""
    if kept is not None:  # the recompute of a checkpointed region: the first run's output (layers.kept_outputs)
        return kept.clone()
    y = frozen_product(x, weight_of(weight, absmax, nested, offset, shape, quant_type, blocksize, nested_blocksize), True)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if lora_A is not None:
        h = x_lora @ lora_A.to(x.dtype).t()
        y2 = y.view(-1, y.shape[-1])  # scaling folded into the small B, summed into y by the GEMM itself
        y2.addmm_(h.view(-1, h.shape[-1]), (lora_B.to(x.dtype) * scaling).t())
    return y


@torch.library.custom_op("nf4tune::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(x: Tensor, x_lora: Optional[Tensor], lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                     scaling: float, bias: Optional[Tensor], kept: Optional[Tensor], weight: Tensor,
                     absmax: Optional[Tensor], nested: Optional[Tensor], offset: Optional[Tensor], shape: list[int],
                     quant_type: str, blocksize: int, nested_blocksize: int) -> Tensor:
    """y = x W^T (+ bias) (+ scaling * (x_lora A^T) B^T) in x's dtype (adapters cast to it), W frozen;
    `kept`, where given, is y from the first run of a checkpointed region (returned, a copy)."""
    return lora_linear(fresh_product, x, x_lora, lora_A, lora_B, scaling, bias, kept, weight, absmax, nested, offset,
                       shape, quant_type, blocksize, nested_blocksize)


@lora_linear_4bit.register_fake
def _(x, x_lora, lora_A, lora_B, scaling, bias, kept, weight, absmax, nested, offset, shape, quant_type, blocksize,
      nested_blocksize):
    return x.new_empty(*x.shape[:-1], shape[0])


def grad_input(frozen_product: Callable, grad_y: Tensor, weight: Tensor, absmax: Optional[Tensor], nested: Optional[Tensor],
               offset: Optional[Tensor], shape: list[int], quant_type: str, blocksize: int,
               nested_blocksize: int) -> Tensor:
    """grad_y @ W computed by `frozen_product(grad_y, w, transposed=False)`."""
    w = weight_of(weight, absmax, nested, offset, shape, quant_type, blocksize, nested_blocksize)
    return frozen_product(grad_y, w, False)


@torch.library.custom_op("nf4tune::grad_input_4bit", mutates_args=())
def grad_input_4bit(grad_y: Tensor, weight: Tensor, absmax: Optional[Tensor], nested: Optional[Tensor],
                    offset: Optional[Tensor], shape: list[int], quant_type: str, blocksize: int,
                    nested_blocksize: int) -> Tensor:
    """grad_y @ W for the frozen weight W, in grad_y's dtype (`lora_linear_4bit`'s input gradient)."""
    return grad_input(fresh_product, grad_y, weight, absmax, nested, offset, shape, quant_type, blocksize,
                      nested_blocksize)


@grad_input_4bit.register_fake
def _(grad_y, weight, absmax, nested, offset, shape, quant_type, blocksize, nested_blocksize):
    return grad_y.new_empty(*grad_y.shape[:-1], shape[1])


def _setup(ctx, inputs, output):
    x, x_lora, lora_A, lora_B, scaling, bias, kept, weight, absmax, nested, offset, *layout = inputs
    ctx.scaling, ctx.layout = scaling, layout
    ctx.save_for_backward(x_lora, lora_A, lora_B, weight, absmax, nested, offset)


def _backward(ctx, grad_y):
    x_lora, lora_A, lora_B, weight, absmax, nested, offset = ctx.saved_tensors
    grad_x = grad_x_lora = grad_A = grad_B = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_input_4bit(grad_y, weight, absmax, nested, offset, *ctx.layout)
    if lora_A is not None:
        a, b = lora_A.to(grad_y.dtype), lora_B.to(grad_y.dtype)
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[3]:
            h = x_lora @ a.t()  # recomputed: r values per token, cheaper to redo than to keep
            grad_B = ((g.t() @ h.reshape(-1, h.shape[-1])) * ctx.scaling).to(lora_B.dtype)
        g_h = (grad_y @ b) * ctx.scaling
        if ctx.needs_input_grad[2]:
            grad_A = (g_h.reshape(-1, g_h.shape[-1]).t() @ x_lora.reshape(-1, x_lora.shape[-1])).to(lora_A.dtype)
        if ctx.needs_input_grad[1]:
            grad_x_lora = g_h @ a
    return (grad_x, grad_x_lora, grad_A, grad_B) + (None,) * 11


lora_linear_4bit.register_autograd(_backward, setup_context=_setup)
