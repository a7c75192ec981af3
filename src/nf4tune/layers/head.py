"""`OutputHead`: the model's 16-bit vocabulary projection (QLoRA leaves it unquantized), an
`nn.Linear` with two fixes for inference on CPU.

- Decoding a few tokens goes through `dispatch.head_matmul` (the AVX512-BF16 kernel): PyTorch's bf16 matrix-vector
  product reads the vocab x hidden weight at a third of the speed (BENCHMARKS.md).
- transformers hands the head `hidden[:, -1:, :]` when it keeps only the last logits: a view whose
  size-1 dimension keeps the sequence's stride. PyTorch's CPU matmul then takes a batched path that
  copies the transposed weight, 25x slower than the plain product; one row is re-laid out instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch


def _standard_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


class OutputHead(nn.Linear):
    """A drop-in for a model's output `nn.Linear`, sharing its parameters (and so any tying)."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "OutputHead":
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        head.weight, head.bias = linear.weight, linear.bias
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.bias is None and dispatch.path("head_matmul", x, self.weight).fast:
            return dispatch.head_matmul(x, self.weight)
        if x.device.type == "cpu" and x.stride() != _standard_strides(x.shape):
            x = x.clone(memory_format=torch.contiguous_format)
        return F.linear(x, self.weight, self.bias)
