"""`Linear4bit`: a frozen 4-bit linear layer with an optional LoRA adapter, as one custom op.

y = x W^T + b + scaling * (dropout(x) A^T) B^T

W is stored quantized (NF4/FP4) and dequantized on the fly in forward, and again in backward for
the input gradient, so no full-precision copy of W outlives a call. Only A and B (and whatever
upstream needs the input gradient) receive gradients. The product and its gradient are the
`nf4tune::lora_linear_4bit` op (`quant.ops`), in eager mode and under torch.compile alike.

Everything runs in the compute dtype: A and B are kept in float32 (the optimizer's master copy) and
cast to the compute dtype for the products, as PEFT does under bf16 autocast, which is how QLoRA
trains. Casting the r x d adapters instead of the tokens x d activations keeps the LoRA path cheap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import dispatch
from ..quant import QuantizedTensor, QuantLayout, ops
from ..registry import UNQUANTIZED
from . import kept_outputs
from .dropout import LoraDropout


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (as PEFT)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class Linear4bit(nn.Module):
    """A linear layer whose weight is frozen in 4-bit, optionally with a trainable LoRA adapter.

    The weight's storage is registered as buffers (`weight_packed`, `weight_absmax`,
    `weight_nested_absmax`) so `.to(device)` moves it; the bias, if any, is a frozen parameter.
    """

    STORAGE = ("weight_packed", "weight_absmax", "weight_nested_absmax")  # the 4-bit weight's tensors

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        for name in self.STORAGE:
            self.register_buffer(name, None)
        self.layout: QuantLayout | None = None  # the weight's, once set
        # the double-quantization offset as a 0-dim CPU tensor, as the ops take it: a tensor is an input
        # of a compiled graph (one graph for every decoder layer), and on the CPU reading it needs no device sync
        self.weight_offset = torch.zeros(())
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_dropout = LoraDropout(0.0)
        self.scaling = 0.0
        self.r = 0
        self._decode_plan = None  # a dispatch.Matmul4bit, made on first use

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias is not None, compute_dtype)
        layer.set_weight(q)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        return layer

    def set_weight(self, q: QuantizedTensor) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a {list(q.shape)} weight does not fit a {self.in_features}->{self.out_features} layer")
        self.weight_packed, self.weight_absmax, self.weight_nested_absmax = q.packed, q.absmax, q.nested_absmax
        self._decode_plan = None
        self.weight_offset = torch.tensor(float(q.offset or 0.0))
        self.layout = q.layout

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The weight as a `QuantizedTensor` (a view of this layer's buffers)."""
        return QuantizedTensor(self.weight_packed, self.weight_absmax, self.layout, self.weight_nested_absmax)

    def weight_args(self) -> tuple:
        """The frozen weight as the `nf4tune::` ops take it: its tensors, then its layout's fields."""
        layout = self.layout
        return (self.weight_packed, self.weight_absmax, self.weight_nested_absmax, self.weight_offset,
                list(layout.shape), layout.quant_type, layout.blocksize, layout.nested_blocksize)

    @property
    def storage_device(self) -> torch.device | None:
        """Where the base weight lives (None before it is loaded)."""
        return self.weight_packed.device if self.weight_packed is not None else None

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        """Attach a LoRA adapter: A Kaiming-uniform (as nn.Linear and PEFT), B zero, so the output is
        unchanged until B learns. scaling = alpha / r (alpha / sqrt(r) with rsLoRA)."""
        device = self.storage_device
        self.r = r
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = LoraDropout(dropout)

    def remove_lora(self) -> None:
        """Drop the adapter: the layer is the 4-bit weight (and bias) alone again."""
        self.lora_A = self.lora_B = None
        self.r, self.scaling = 0, 0.0
        self.lora_dropout = LoraDropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and not torch.is_grad_enabled() and dispatch.fuses(x, self.in_features):
            matmul = self.fused_matmul(x)
            if matmul is not None:
                return self.infer(x, matmul)
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        x_lora, scaling = None, self.scaling
        if self.lora_A is not None:
            x_lora, keep_scale = self.lora_dropout(x)
            scaling *= keep_scale
        region = None if compiling else kept_outputs.current()  # a gradient-checkpointed region that keeps outputs
        kept = region.take(self) if region is not None else None
        y = ops.lora_linear_4bit(x, x_lora, self.lora_A, self.lora_B, float(scaling), self.bias, kept,
                                 *self.weight_args())
        if region is not None and kept is None:
            region.keep(self, y)
        return y.to(in_dtype)

    def frozen_weight(self) -> QuantizedTensor | torch.Tensor:
        """The base weight as the LoRA product takes it: here the 4-bit `quantized_weight`."""
        return self.quantized_weight

    def dequantized_weight(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight in `dtype` (what the decoders batch their projections from): a fresh tensor, or
        written into `out` (a contiguous buffer of at least as many values of `dtype`) and returned as a view."""
        q = self.quantized_weight
        if out is None:
            return q.dequantize(dtype)
        return dispatch.dequantize_4bit(q.packed, q.float_absmax(), q.shape, q.quant_type, q.blocksize, dtype, out=out)

    def fused_matmul(self, x: torch.Tensor):
        """The fused kernel for this weight on x's device (`dispatch.fused_matmul_4bit`), prepared once
        (again if the buffers move), or None where there is none."""
        packed = self.weight_packed
        plan = self._decode_plan
        if plan is not None and plan.q.packed.data_ptr() == packed.data_ptr() and plan.q.absmax is self.weight_absmax:
            return plan if x.device == packed.device else None
        self._decode_plan = None
        if x.device != packed.device or not packed.is_contiguous():
            return None
        self._decode_plan = dispatch.fused_matmul_4bit(self.quantized_weight)
        return self._decode_plan

    def infer(self, x: torch.Tensor, matmul) -> torch.Tensor:
        """Inference without autograd, where `matmul(x)` computes x @ W^T: the fused kernel from
        `fused_matmul` (a few tokens: the 4-bit weight is decoded in registers, never written out), or
        a product with a weight the caller dequantized once for several calls.

        The adapter is added unmerged, with its float32 masters as they are: on CPU these few-token
        products run 3-4x faster in float32 than in bf16 (bf16 calls this small carry tens of
        microseconds of fixed cost), and casting the masters on every call cost more than the products.
        With a fused kernel they go through its `matmul_f32` (on CPU, a row's result then does not depend
        on its batch)."""
        x_c = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        if self.bias is None and self.lora_A is None:
            y = matmul(x_c)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        fused = isinstance(matmul, dispatch.Matmul4bit)
        # the fused kernels sum in float32 and can hand that over: bias and adapter join before one rounding
        y = matmul(x_c, float32_out=True) if fused else matmul(x_c).float()
        if self.bias is not None:
            y = y + self.bias.float()
        if self.lora_A is not None:
            a, b = self.lora_A.float(), self.lora_B.float()  # no copies for float32 masters
            if fused:  # on CPU summed alike whatever the batch (see matmul_f32)
                x2 = x_c.reshape(-1, self.in_features).float()
                lora = matmul.matmul_f32(matmul.matmul_f32(x2, a), b).view(y.shape)
            else:
                lora = (x_c.float() @ a.t()) @ b.t()
            y = y + lora * self.scaling
        y = y.to(self.compute_dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", {self.layout.quant_type if self.layout else '?'}, compute_dtype={self.compute_dtype}"
        return s + (f", lora_r={self.r}" if self.r else "")


class Linear16bit(Linear4bit):
    """A linear layer whose frozen weight is kept unquantized, in the compute dtype: the 16-bit LoRA
    baseline (quant_type "none"). The weight is the buffer `weight`, the name transformers gives it.

    It is a `Linear4bit` in all but the weight's storage, so the adapter, its autograd product, gradient
    checkpointing's kept outputs, inference and everything that finds LoRA layers by class are one code
    path for both; the only difference from QLoRA is how the base is stored.
    """

    STORAGE = ("weight",)

    def set_weight(self, weight: torch.Tensor | QuantizedTensor) -> None:
        """Store `weight` in the compute dtype (a 4-bit one, from a pre-quantized checkpoint, dequantized)."""
        if isinstance(weight, QuantizedTensor):
            weight = weight.dequantize(self.compute_dtype)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a {list(weight.shape)} weight does not fit a {self.in_features}->{self.out_features} layer")
        # always a copy: a tensor read from a checkpoint is a view of its mmapped shard
        self.weight = weight.detach().to(self.compute_dtype, copy=True)
        self.layout = QuantLayout(weight.shape, self.compute_dtype, UNQUANTIZED)

    @property
    def quantized_weight(self) -> QuantizedTensor:
        raise TypeError("a Linear16bit layer's weight is not quantized; use frozen_weight() or dequantized_weight().")

    @property
    def storage_device(self) -> torch.device | None:
        return self.weight.device if self.weight is not None else None

    def frozen_weight(self) -> torch.Tensor:
        return self.weight

    def weight_args(self) -> tuple:
        """The dense weight as the `nf4tune::` ops take it (quant_type "none": no absmax)."""
        return self.weight, None, None, None, list(self.layout.shape), UNQUANTIZED, 0, 0

    def dequantized_weight(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return self.weight.to(dtype, copy=True)
        return out[:self.weight.numel()].view(self.weight.shape).copy_(self.weight)

    def fused_matmul(self, x: torch.Tensor):
        """For a few tokens without autograd, `infer` with the plain matmul (as Linear4bit with its fused
        kernel), so both layers round the adapter's term alike."""
        return self._plain_matmul if x.device == self.weight.device else None

    def _plain_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()
