"""The 4-bit linear layer with LoRA as `torch.library` custom ops, so that `torch.compile` of a decoder
layer traces through it without a graph break (the norms, rotary, SwiGLU, residual adds and casts
around it then fuse), while the 4-bit weight stays opaque: dequantized on the fastest path for its
device (`nf4tune.dispatch`, through `QuantizedTensor.dequantize`), in forward and again in backward.

`nf4tune::dequantize_4bit` is the weight alone; `nf4tune::lora_linear_4bit` is
y = x W^T + b + scaling * (x_lora A^T) B^T with the same arithmetic as `layers.linear4bit`'s autograd
function (the eager path), and a backward that recomputes the small x_lora A^T instead of saving it;
its input gradient grad_y W is `nf4tune::grad_input_4bit`. Inside these two ops the weight is
dequantized through `dequantize_weight`, which `nf4tune.dispatch` points at its reused per-thread
buffer: the weight never leaves the op, so no graph sees (or schedules around) the shared buffer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant import QuantizedTensor


def _weight(packed: Tensor, absmax: Tensor, nested: Optional[Tensor], shape: list[int], quant_type: str,
            blocksize: int, offset, nested_blocksize: int) -> QuantizedTensor:
    """The weight's parts as a `QuantizedTensor`; `offset` a float or a 0-dim CPU tensor (no device sync)."""
    return QuantizedTensor(packed, absmax, torch.Size(shape), torch.bfloat16, quant_type, blocksize,
                           float(offset) if nested is not None else None, nested, nested_blocksize)


def _fresh(q: QuantizedTensor, dtype: torch.dtype) -> Tensor:
    return q.dequantize(dtype)


dequantize_weight = _fresh  # (q, dtype) -> W: a weight used at once inside one op and dropped


def use_dequantize(fn) -> None:
    """Dequantize the weights inside the ops with `fn(q, dtype)` (dispatch's reused buffer)."""
    global dequantize_weight
    dequantize_weight = fn


def _through_weight(x: Tensor, q: QuantizedTensor) -> Tensor:
    return x @ q.dequantize(x.dtype).t()


matmul_weight = _through_weight  # (x, q) -> x W^T: dispatch points it at the fused few-token kernels


def use_matmul(fn) -> None:
    """Compute `nf4tune::matmul_4bit` with `fn(x, q)` (dispatch's fused kernel where there is one)."""
    global matmul_weight
    matmul_weight = fn


@torch.library.custom_op("nf4tune::matmul_4bit", mutates_args=())
def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, nested: Optional[Tensor], shape: list[int], quant_type: str,
                blocksize: int, offset: float, nested_blocksize: int) -> Tensor:
    """x @ W^T for the 4-bit weight W (a decoding step's few tokens: W decoded on the fly), in x's dtype."""
    return matmul_weight(x, _weight(packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize))


@matmul_4bit.register_fake
def _(x, packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("nf4tune::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, nested: Optional[Tensor], shape: list[int], quant_type: str,
                    blocksize: int, offset: float, nested_blocksize: int, dtype: torch.dtype) -> Tensor:
    """The 4-bit weight described by these parts, dequantized to `dtype`."""
    return _weight(packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize).dequantize(dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("nf4tune::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(x: Tensor, x_lora: Optional[Tensor], lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                     scaling: float, bias: Optional[Tensor], packed: Tensor, absmax: Tensor, nested: Optional[Tensor],
                     shape: list[int], quant_type: str, blocksize: int, offset: Tensor,
                     nested_blocksize: int) -> Tensor:
    """x @ W^T (+ bias) (+ scaling * (x_lora @ A^T) @ B^T), in x's dtype (adapters cast to it). The
    double-quantization `offset` is a 0-dim CPU tensor: as a float, each layer's value would be a
    constant of its graph, and every decoder layer would compile again."""
    w = dequantize_weight(_weight(packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize),
                          x.dtype)
    y = x @ w.t()
    del w
    if bias is not None:
        y = y + bias.to(y.dtype)
    if lora_A is not None:
        h = x_lora @ lora_A.to(x.dtype).t()
        y2 = y.view(-1, y.shape[-1])  # scaling folded into the small B, summed into y by the GEMM itself
        y2.addmm_(h.view(-1, h.shape[-1]), (lora_B.to(x.dtype) * scaling).t())
    return y


@lora_linear_4bit.register_fake
def _(x, x_lora, lora_A, lora_B, scaling, bias, packed, absmax, nested, shape, quant_type, blocksize, offset,
      nested_blocksize):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("nf4tune::grad_input_4bit", mutates_args=())
def grad_input_4bit(grad_y: Tensor, packed: Tensor, absmax: Tensor, nested: Optional[Tensor], shape: list[int],
                    quant_type: str, blocksize: int, offset: Tensor, nested_blocksize: int) -> Tensor:
    """grad_y @ W for the 4-bit weight W, in grad_y's dtype."""
    w = dequantize_weight(_weight(packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize),
                          grad_y.dtype)
    return grad_y @ w


@grad_input_4bit.register_fake
def _(grad_y, packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize):
    return grad_y.new_empty(*grad_y.shape[:-1], shape[1])


def _setup(ctx, inputs, output):
    x, x_lora, lora_A, lora_B, scaling, bias, packed, absmax, nested, shape, quant_type, blocksize, offset, \
        nested_blocksize = inputs
    ctx.scaling, ctx.meta = scaling, (shape, quant_type, blocksize, nested_blocksize)
    ctx.save_for_backward(x_lora, lora_A, lora_B, packed, absmax, nested, offset)


def _backward(ctx, grad_y):
    x_lora, lora_A, lora_B, packed, absmax, nested, offset = ctx.saved_tensors
    grad_x = grad_x_lora = grad_A = grad_B = None
    if ctx.needs_input_grad[0]:
        shape, quant_type, blocksize, nested_blocksize = ctx.meta
        grad_x = grad_input_4bit(grad_y, packed, absmax, nested, shape, quant_type, blocksize, offset, nested_blocksize)
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
    return (grad_x, grad_x_lora, grad_A, grad_B) + (None,) * 10


lora_linear_4bit.register_autograd(_backward, setup_context=_setup)
