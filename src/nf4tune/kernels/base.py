"""What every device's fused 4-bit matmul offers, so that callers need not know which one they hold."""

from __future__ import annotations

import torch


class Matmul4bit:
    """x @ W^T for one 4-bit `QuantizedTensor` W (N x K), prepared once for many calls.

    Attributes: `q` (the weight), `n`, `k`. Calling it takes x (..., K) and returns (..., N) in x's
    dtype, or in float32 with `float32_out` (a bias or adapter still to be added before one rounding).
    """

    q: object
    n: int
    k: int

    def __call__(self, x: torch.Tensor, float32_out: bool = False) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def matmul_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ weight^T, both float32 on this kernel's device (the adapters' products), each
        output summed in an order that does not depend on M where the device allows."""
        return x @ weight.t()
