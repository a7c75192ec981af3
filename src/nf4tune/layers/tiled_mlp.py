"""A decoder layer's MLP a chunk of tokens at a time, so that backward holds one chunk's activations.

An MLP acts on each token alone, but autograd saves its gate, up, activation and product outputs for
the whole sequence: at 32k tokens and intermediate size 1408, about 460 MB per layer in bf16 (inside the
recomputed layer of gradient checkpointing, where that is most of what is held). `TiledMLP` wraps an MLP
module's class: from `TILE_TOKENS` tokens on, while gradients are recorded, its forward runs chunk by
chunk keeping only its input, and its backward reruns one chunk at a time and differentiates it (the
trainable parameters' gradients accumulate as usual). The random state is replayed, so LoRA dropout
draws the same masks in backward as in forward: gradients equal the untiled MLP's.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

TILE_TOKENS = 16384  # from this many tokens (batch x sequence) on, the MLP is tiled while training: below, its
# activations are small next to the rest of the step (8k tokens, intermediate 1408: about 140 MB per layer), and
# tiling would cost a third pass of its matmuls (the recompute in backward)
CHUNK_TOKENS = 2048  # tokens per chunk


def _chunks(tokens: int, size: int):
    return [(i, min(i + size, tokens)) for i in range(0, tokens, size)]


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, chunk):
        flat = x.reshape(-1, x.shape[-1])
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        outs = []
        for i, j in _chunks(flat.shape[0], chunk):
            # with gradients on, as the untiled MLP runs in training (dropout; no inference-only fast path),
            # the chunk's graph dropped at once
            with torch.enable_grad():
                outs.append(forward(flat[i:j].detach()).detach())
        ctx.save_for_backward(x)
        ctx.forward, ctx.chunk = forward, chunk
        out = torch.cat(outs)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat, grad_flat = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        cpu_state, cuda_state = ctx.rng
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x.device)
            for i, j in _chunks(flat.shape[0], ctx.chunk):
                with torch.enable_grad():
                    part = flat[i:j].detach().requires_grad_(x.requires_grad)
                    out = ctx.forward(part)
                    torch.autograd.backward(out, grad_flat[i:j])  # parameters' .grad accumulate here
                if x.requires_grad:
                    grad_x[i:j] = part.grad
        return (grad_x.reshape(x.shape) if x.requires_grad else None), None, None


class TiledMLP:
    """Mixed into an MLP module's class by `tile_mlps`: its forward (mapping (..., hidden) to (..., hidden)
    token by token) tiled over tokens from `TILE_TOKENS` on while gradients are recorded; otherwise as it was.
    One class per MLP class, shared by every layer, so that compiled layers still share their graphs."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        untiled = super().forward
        if args or kwargs or not torch.is_grad_enabled() or x.numel() < TILE_TOKENS * x.shape[-1] \
                or torch.compiler.is_compiling():
            return untiled(x, *args, **kwargs)
        return _Tiled.apply(x, untiled, CHUNK_TOKENS)


@functools.cache
def tiled_class(cls: type) -> type:
    """`cls` with `TiledMLP`'s forward (one class per MLP class)."""
    return type(cls.__name__, (TiledMLP, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def tile_mlps(model: nn.Module, name: str = "mlp") -> int:
    """Tile every submodule called `name` (the decoder layers' MLPs); returns how many."""
    count = 0
    for module_name, module in model.named_modules():
        if module_name.rpartition(".")[2] == name and not isinstance(module, TiledMLP):
            module.__class__ = tiled_class(type(module))
            count += 1
    return count


def untile_mlps(model: nn.Module) -> None:
    """Give the tiled MLPs their own class back."""
    for module in model.modules():
        if isinstance(module, TiledMLP):
            module.__class__ = type(module).__mro__[2]


__all__ = ["CHUNK_TOKENS", "TILE_TOKENS", "TiledMLP", "tile_mlps", "tiled_class", "untile_mlps"]
