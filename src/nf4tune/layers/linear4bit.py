"""`Linear4bit`: a frozen 4-bit linear layer with an optional LoRA adapter, as one autograd function.

y = x W^T + b + scaling * (dropout(x) A^T) B^T

W is stored quantized (NF4/FP4) and dequantized on the fly in forward, and again in backward for
the input gradient, so no full-precision copy of W outlives a call. Only A and B (and whatever
upstream needs the input gradient) receive gradients.

Everything runs in the compute dtype: A and B are kept in float32 (the optimizer's master copy) and
cast to the compute dtype for the products, as PEFT does under bf16 autocast, which is how QLoRA
trains. Casting the r x d adapters instead of the tokens x d activations keeps the LoRA path cheap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import dispatch
from ..quant import QuantizedTensor
from . import kept_outputs
from .dropout import LoraDropout


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (as PEFT)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# Up to this many tokens, inference multiplies through the 4-bit weight directly (dispatch.fused_matmul_4bit);
# beyond, dequantizing once and calling the BLAS matmul is faster (BENCHMARKS.md).
FUSED_MAX_TOKENS = 16


def _dense(weight: QuantizedTensor | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight in `dtype`: dequantized into a reused buffer, or (an unquantized base,
    `Linear16bit`) the stored tensor itself."""
    if isinstance(weight, torch.Tensor):
        return weight if weight.dtype == dtype else weight.to(dtype)
    return dispatch.dequantize_scratch(weight, dtype)


class _Lora4bitMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, scaling, bias, weight: QuantizedTensor, kept=None):
        # kept: this call's output from the first run of a checkpointed region (layers.kept_outputs):
        # the recompute then only redoes the small LoRA product that backward saves.
        y = kept
        if y is None:
            # float32 where the CPU's bf16 GEMM is the slower (dispatch.training_matmul_dtype)
            w = _dense(weight, dispatch.training_matmul_dtype(x))  # a reused buffer: w is dropped right after
            y = dispatch.matmul_in(x, w.t(), w.dtype)
            del w
            if bias is not None:
                y = y + bias.to(y.dtype)
        a = b = h = None
        if lora_A is not None:
            a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
            h = x_lora @ a.t()
            if kept is None:
                # scaling folded into the small B, and the product accumulated into y by the GEMM itself:
                # no extra passes over the tokens x out output.
                y2 = y.view(-1, y.shape[-1])
                y2.addmm_(h.view(-1, h.shape[-1]), (b * scaling).t())
        ctx.weight, ctx.scaling = weight, scaling
        ctx.adapter_dtype = lora_A.dtype if lora_A is not None else None
        ctx.save_for_backward(x_lora, a, b, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, a, b, h = ctx.saved_tensors
        grad_x = grad_x_lora = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            w = _dense(ctx.weight, dispatch.training_matmul_dtype(grad_y))
            grad_x = dispatch.matmul_in(grad_y, w, w.dtype)
        if a is not None:
            g = grad_y.reshape(-1, grad_y.shape[-1])
            if ctx.needs_input_grad[3]:
                grad_B = ((g.t() @ h.reshape(-1, h.shape[-1])) * ctx.scaling).to(ctx.adapter_dtype)
            g_h = (grad_y @ b) * ctx.scaling
            if ctx.needs_input_grad[2]:
                grad_A = (g_h.reshape(-1, g_h.shape[-1]).t() @ x_lora.reshape(-1, x_lora.shape[-1])).to(ctx.adapter_dtype)
            if ctx.needs_input_grad[1]:
                grad_x_lora = g_h @ a
        return grad_x, grad_x_lora, grad_A, grad_B, None, None, None, None


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
        self._quant_meta: dict = {}
        # the double-quantization offset as a 0-dim CPU tensor, for the compiled path: a tensor is an input
        # of the graph (one graph for every decoder layer), and on the CPU reading it needs no device sync
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
        self._quant_meta = dict(shape=q.shape, dtype=q.dtype, quant_type=q.quant_type, blocksize=q.blocksize,
                                offset=q.offset, nested_blocksize=q.nested_blocksize)

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The weight as a `QuantizedTensor` (a view of this layer's buffers)."""
        return QuantizedTensor(self.weight_packed, self.weight_absmax, nested_absmax=self.weight_nested_absmax,
                               **self._quant_meta)

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
        if not compiling and not torch.is_grad_enabled() and x.numel() <= FUSED_MAX_TOKENS * self.in_features:
            matmul = self.fused_matmul(x)
            if matmul is not None:
                return self.infer(x, matmul)
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        x_lora, scaling = None, self.scaling
        if self.lora_A is not None:
            x_lora, keep_scale = self.lora_dropout(x)
            scaling *= keep_scale
        y = self._compiled_product(x, x_lora, scaling) if compiling else self._product(x, x_lora, scaling)
        return y.to(in_dtype)

    def _compiled_product(self, x: torch.Tensor, x_lora: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The same arithmetic as `_product`, as a custom op, which torch.compile traces through."""
        return dispatch.lora_linear_4bit(x, x_lora, self.lora_A, self.lora_B, scaling, self.bias, self.weight_packed,
                                         self.weight_absmax, self.weight_nested_absmax, self._quant_meta,
                                         self.weight_offset)

    def _product(self, x: torch.Tensor, x_lora: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """x W^T + b + the adapter's term, through autograd (the eager path of `forward`)."""
        region = kept_outputs.current()  # inside a gradient-checkpointed region that keeps outputs
        kept = region.take(self) if region is not None else None
        y = _Lora4bitMatmul.apply(x, x_lora, self.lora_A, self.lora_B, scaling, self.bias, self.frozen_weight(), kept)
        if region is not None and kept is None:
            region.keep(self, y)
        return y

    def frozen_weight(self) -> QuantizedTensor | torch.Tensor:
        """The base weight as the LoRA product takes it: here the 4-bit `quantized_weight`."""
        return self.quantized_weight

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight in `dtype`, a fresh tensor (what the decoders batch their projections from)."""
        return self.quantized_weight.dequantize(dtype)

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
        meta = self._quant_meta
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", {meta.get('quant_type', '?')}, compute_dtype={self.compute_dtype}"
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
        self._quant_meta = dict(shape=weight.shape, quant_type="none")

    @property
    def quantized_weight(self) -> QuantizedTensor:
        raise TypeError("a Linear16bit layer's weight is not quantized; use frozen_weight() or dequantized_weight().")

    @property
    def storage_device(self) -> torch.device | None:
        return self.weight.device if self.weight is not None else None

    def frozen_weight(self) -> torch.Tensor:
        return self.weight

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype, copy=True)

    def _compiled_product(self, x: torch.Tensor, x_lora: torch.Tensor | None, scaling: float) -> torch.Tensor:
        # no 4-bit custom op to hide: torch.compile traces the eager product as it is
        return self._product(x, x_lora, scaling)

    def fused_matmul(self, x: torch.Tensor):
        """For a few tokens without autograd, `infer` with the plain matmul (as Linear4bit with its fused
        kernel), so both layers round the adapter's term alike."""
        return self._plain_matmul if x.device == self.weight.device else None

    def _plain_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()
