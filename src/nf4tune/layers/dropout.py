"""Dropout for LoRA inputs that draws ~p random numbers per element instead of one.

Dropping each element independently with probability p is a Bernoulli process, and the gaps between
dropped positions are i.i.d. Geometric(p). For QLoRA's p = 0.05 to 0.1, drawing those gaps takes 10
to 20 times fewer random numbers than a per-element mask, and random number generation is what
dominates dropout on CPU (BENCHMARKS.md).

The mask is 0/1 in the input's dtype (exact in bf16); the inverted-dropout factor 1 / (1 - p) is
returned apart, for the caller to fold into the LoRA scaling: A (x * m) / (1 - p) = (A (x * m)) / (1 - p).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Above this p a per-element mask draws fewer numbers than the gaps do.
_SPARSE_MAX_P = 0.25


def _gaps(count: int, p: float, device: torch.device) -> torch.Tensor:
    """`count` Geometric(p) draws (values >= 1), as int64: ceil(log(1 - U) / log(1 - p)). Vectorized
    float32 rand + log1p is twice as fast as `geometric_`; its 24-bit uniforms only cut the tail
    beyond gaps of about 17 / p, which has probability below 1e-7."""
    u = torch.rand(count, device=device)
    return u.neg_().log1p_().div_(math.log1p(-p)).ceil_().clamp_(min=1).to(torch.int64)


def dropped_positions(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Indices in [0, n) each included independently with probability p."""
    expected = n * p
    count = int(expected + 8 * math.sqrt(expected) + 64)  # covers n with overwhelming probability
    ends = _gaps(count, p, device).cumsum_(0)
    while ends[-1] <= n:  # rarely, the gaps fall short of n: draw more
        ends = torch.cat([ends, _gaps(count, p, device).cumsum_(0) + ends[-1]])
    ends -= 1  # a gap of k means the k-th position from here is dropped
    return ends[ends < n]


class _ZeroPositions(torch.autograd.Function):
    """x with the given flat positions zeroed; backward zeroes the same positions of the gradient.
    Saves only the positions (about p of the elements), not a mask."""

    @staticmethod
    def forward(ctx, x, positions):
        out = x.clone()
        out.view(-1)[positions] = 0
        ctx.save_for_backward(positions)
        return out

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        grad = grad.clone()
        grad.view(-1)[positions] = 0
        return grad, None


class LoraDropout(nn.Module):
    """Inverted dropout for LoRA inputs: returns (x with dropped elements zeroed, 1 / (1 - p)), or
    (x, 1.0) when not training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not self.training or self.p == 0:
            return x, 1.0
        # Under torch.compile one dense mask: the gaps' data-dependent lengths would break the graph.
        if self.p > _SPARSE_MAX_P or torch.compiler.is_compiling():
            return x * torch.empty_like(x).bernoulli_(1 - self.p), 1 / (1 - self.p)
        x = x.contiguous()
        return _ZeroPositions.apply(x, dropped_positions(x.numel(), self.p, x.device)), 1 / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
