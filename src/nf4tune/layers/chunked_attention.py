"""Attention that never holds a sequence x sequence matrix: registered with transformers as `nf4tune_chunked`.

transformers' own implementations hold one for every masked case: `eager` its scores, `sdpa` a boolean
batch x q x kv mask as soon as the batch has padding, packed rows or a sliding window (32k tokens: 1 GiB
per row), and `sdpa` refuses Gemma 2's soft-capping. `nf4tune_chunked` is registered through transformers'
public interfaces (`AttentionInterface`, `AttentionMaskInterface`) and chooses by length:

- below `LONG_TOKENS` query tokens, what `sdpa` does (its mask, its kernel; soft-capped models the
  chunked kernel below on that mask): short sequences pay nothing for the choice;
- from `LONG_TOKENS` on, the mask is a `BlockwiseMask`: the mask *function* transformers composed (causal,
  padding, packed rows, sliding window, whatever a model adds) evaluated one block at a time. A plain causal
  mask (no padding, no cache offset) goes to PyTorch's fused SDPA with `is_causal` (flash kernels on CPU
  and CUDA hold no scores); any other mask to `blocked_sdpa`: the fused kernel a block of queries at a time,
  each on the keys its mask leaves it (causal: the past; sliding: the window; packed: its document) with
  that block's mask, backward recomputing the block (`_QueryBlockedSDPA`); soft-capped scores (Gemma 2),
  which no fused kernel computes, to `chunked_attention`: a flash-style online softmax over key blocks,
  forward and backward (`_ChunkedAttention` recomputes each block's scores in backward from the saved
  log-sum-exp), skipping blocks the mask leaves empty.

Grouped-query attention is computed on the kv heads as they are (no repeat of keys and values).

In training on CPU, a plain causal attention goes through the CPU flash kernel directly (`_KeptCausalFlash`: its
output kept through the checkpoint) and, like the query-blocked SDPA and the soft-capped online softmax, computes in
`dispatch.training_attention_dtype`:
float32 for bf16 inputs where the CPU's float32 GEMM is the faster (without AMX: 1.3-1.9x less CPU time per layer
at 8k-16k tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import dispatch
from . import kept_outputs

NAME = "nf4tune_chunked"
LONG_TOKENS = 4096  # from this many query tokens on, no mask is materialized whole
BLOCK = 512  # query and key tokens per block: a block's scores are heads x BLOCK x BLOCK float32


@dataclass
class BlockwiseMask:
    """A transformers attention mask not materialized: `mask_function(batch, head, q, kv)` (transformers'
    composed mask function) with the 2D padding mask and offsets it was created with, evaluated per block."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    padding: torch.Tensor | None
    use_vmap: bool
    device: torch.device
    plain_causal: bool  # causal, no padding, no offset: what SDPA's is_causal computes

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """The mask of queries [q0, q1) x keys [k0, k1): bool (batch, 1, q1 - q0, k1 - k0), True = attend."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](
            batch_size=self.batch_size, q_length=q1 - q0, kv_length=k1 - k0, q_offset=self.q_offset + q0,
            kv_offset=self.kv_offset + k0, mask_function=self.mask_function, attention_mask=self.padding,
            allow_is_causal_skip=False, use_vmap=self.use_vmap, device=self.device)


class _DenseBlocks:
    """A materialized mask (bool, True = attend; or additive float) read block by block like a BlockwiseMask."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        part = self.mask[..., q0:q1, k0:k1]
        return part if part.dtype == torch.bool else part > torch.finfo(part.dtype).min / 2


class _CausalBlocks:
    """SDPA's is_causal (what transformers leaves to it by passing no mask): query i attends keys <= i + t - s."""

    def __init__(self, shift: int, device):
        self.shift, self.device = shift, device

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        rows = torch.arange(q0, q1, device=self.device)[:, None] + self.shift
        return (torch.arange(k0, k1, device=self.device)[None, :] <= rows)[None, None]


def _blocks(mask, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
    """The block's mask as (batch, 1, 1, q, k) bool for the grouped layout, None if every pair attends;
    False if none does (the block is skipped)."""
    if mask is None:
        return None
    part = mask.block(q0, q1, k0, k1)
    if not bool(part.any()):
        return False
    if bool(part.all()):
        return None
    return part.unsqueeze(2)  # (batch, 1, 1, q, k): one mask for every kv head and group


def _scores(qb, kb, scale: float, softcap: float | None):
    """Scaled (and soft-capped) scores of a block in float32, and tanh of the capped ones (for backward)."""
    s = torch.matmul(qb, kb.transpose(-1, -2)).float() * scale
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, t


def _forward(q, k, v, mask, scale, softcap, block, dtype):
    """Online softmax over key blocks: output (grouped layout, q's dtype) and log-sum-exp (float32); the
    products in `dtype`, each block converted on the way in."""
    b, kvh, g, s, d = q.shape
    t = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, kvh, g, s, dtype=torch.float32, device=q.device)
    for q0 in range(0, s, block):
        q1 = min(q0 + block, s)
        qb = q[:, :, :, q0:q1].to(dtype)
        m_i = torch.full((b, kvh, g, q1 - q0), -math.inf, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(b, kvh, g, q1 - q0, v.shape[-1], device=q.device)
        for k0 in range(0, t, block):
            k1 = min(k0 + block, t)
            part = _blocks(mask, q0, q1, k0, k1)
            if part is False:
                continue
            sc, _ = _scores(qb, k[:, :, None, k0:k1].to(dtype), scale, softcap)
            if part is not None:
                sc = sc.masked_fill(~part, -math.inf)
            m_new = torch.maximum(m_i, sc.amax(-1))
            m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
            p = torch.exp(sc - m_safe.unsqueeze(-1))
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p.to(dtype), v[:, :, None, k0:k1].to(dtype)).float()
            m_i = m_new
        empty = l_i == 0  # a query that attends to nothing (padding): output 0, and no gradient
        out[:, :, :, q0:q1] = (acc / torch.where(empty, 1.0, l_i).unsqueeze(-1)).to(q.dtype)
        lse[:, :, :, q0:q1] = torch.where(empty, math.inf, torch.where(m_i == -math.inf, 0.0, m_i) + torch.log(l_i))
    return out, lse


class _ChunkedAttention(torch.autograd.Function):
    """Flash-style attention in the grouped layout q (b, kv_heads, groups, s, d), k / v (b, kv_heads, t, d):
    saves q, k, v, the output and the log-sum-exp; backward recomputes each block's scores. The products run
    in `dtype` (`dispatch.training_attention_dtype`), a block at a time converted; what is saved stays in q's."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, softcap, block, dtype):
        out, lse = _forward(q, k, v, mask, scale, softcap, block, dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.softcap, ctx.block, ctx.dtype = mask, scale, softcap, block, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale, softcap, block, dtype = ctx.mask, ctx.scale, ctx.softcap, ctx.block, ctx.dtype
        s, t = q.shape[3], k.shape[2]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O): softmax's backward term
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for q0 in range(0, s, block):
            q1 = min(q0 + block, s)
            qb, gb = q[:, :, :, q0:q1].to(dtype), grad_out[:, :, :, q0:q1].to(dtype)
            lb, db = lse[:, :, :, q0:q1].unsqueeze(-1), delta[:, :, :, q0:q1].unsqueeze(-1)
            for k0 in range(0, t, block):
                k1 = min(k0 + block, t)
                part = _blocks(mask, q0, q1, k0, k1)
                if part is False:
                    continue
                kb, vb = k[:, :, None, k0:k1].to(dtype), v[:, :, None, k0:k1].to(dtype)
                sc, tanh = _scores(qb, kb, scale, softcap)
                p = torch.exp(sc - lb)
                if part is not None:
                    p = p.masked_fill(~part, 0.0)
                dv[:, :, k0:k1] += torch.matmul(p.to(gb.dtype).transpose(-1, -2), gb).float().sum(2)
                ds = p * (torch.matmul(gb, vb.transpose(-1, -2)).float() - db)
                if tanh is not None:
                    ds = ds * (1 - tanh * tanh)
                ds = (ds * scale).to(dtype)
                dq[:, :, :, q0:q1] += torch.matmul(ds, kb).float()
                dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb).float().sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _query_blocks(mask, s: int, t: int, block: int):
    """Per query block: (q0, q1, k0, k1, mask of the block or None): the keys trimmed to those the block's
    queries attend to; a query that attends to nothing (padding) attends to all of them instead, as SDPA
    would give it NaN (its output reaches no loss, and its zero gradient adds nothing)."""
    for q0 in range(0, s, block):
        q1 = min(q0 + block, s)
        part = mask.block(q0, q1, 0, t)
        cols = part.any(dim=(0, 1, 2)).nonzero()
        if cols.numel() == 0:
            yield q0, q1, 0, t, None
            continue
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        part = part[..., k0:k1]
        part = part | ~part.any(-1, keepdim=True)
        yield q0, q1, k0, k1, None if bool(part.all()) else part


class _QueryBlockedSDPA(torch.autograd.Function):
    """PyTorch's fused SDPA a block of queries at a time, each on the keys its mask leaves it, with that
    block's mask (never the whole one); backward recomputes each block's attention and differentiates it.
    Each block runs in `dtype` (`dispatch.training_attention_dtype`), its q, k and v converted on the way."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, block, dtype):
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        for q0, q1, k0, k1, part in _query_blocks(mask, q.shape[2], k.shape[2], block):
            out[:, :, q0:q1] = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, q0:q1].to(dtype), k[:, :, k0:k1].to(dtype), v[:, :, k0:k1].to(dtype), attn_mask=part,
                scale=scale, enable_gqa=gqa)
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.scale, ctx.block, ctx.dtype = mask, scale, block, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        gqa = q.shape[1] != k.shape[1]
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for q0, q1, k0, k1, part in _query_blocks(ctx.mask, q.shape[2], k.shape[2], ctx.block):
            with torch.enable_grad():
                qb, kb, vb = (x.detach().to(ctx.dtype).requires_grad_()
                              for x in (q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]))
                out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=part, scale=ctx.scale,
                                                                       enable_gqa=gqa)
                gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), grad_out[:, :, q0:q1].to(ctx.dtype))
            dq[:, :, q0:q1] = gq
            dk[:, :, k0:k1] += gk
            dv[:, :, k0:k1] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def blocked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scale: float | None = None,
                 block: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused SDPA of query (b, heads, s, d) over key / value (b, kv_heads, t, d) under `mask` (a
    `BlockwiseMask` or a materialized mask, bool True = attend), `block` queries at a time: memory per
    block (its mask is block x t booleans), never s x t. `dtype`: what the products run in (default query's;
    the output and gradients come back in query's). Returns (b, heads, s, d)."""
    if isinstance(mask, torch.Tensor):
        mask = _DenseBlocks(mask)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _QueryBlockedSDPA.apply(query, key, value, mask, scale, 2 * BLOCK if block is None else block,
                                   query.dtype if dtype is None else dtype)


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None,
                      scale: float | None = None, softcap: float | None = None, block: int | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax attention of query (b, heads, s, d) over key / value (b, kv_heads, t, d), heads a multiple of
    kv_heads, a key block at a time: memory per block, never s x t. `mask`: None (every pair attends), a
    `BlockwiseMask`, or a materialized mask broadcastable to (b, 1, s, t) (bool, True = attend, or additive
    float). `dtype`: what the products compute in (default query's). Returns (b, heads, s, d) in query's dtype."""
    b, h, s, d = query.shape
    kvh = key.shape[1]
    if h % kvh:
        raise ValueError(f"{h} query heads cannot share {kvh} key/value heads evenly.")
    if isinstance(mask, torch.Tensor):
        mask = _DenseBlocks(mask)
    scale = d ** -0.5 if scale is None else scale
    block = BLOCK if block is None else block
    grouped = query.reshape(b, kvh, h // kvh, s, d)
    out = _ChunkedAttention.apply(grouped, key, value, mask, scale, softcap, block,
                                  query.dtype if dtype is None else dtype)
    return out.reshape(b, h, s, d)


def _flash_cpu():
    """PyTorch's CPU flash-attention kernel and its backward (what SDPA calls on CPU), or None."""
    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return None
    return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward


# Where the kernel runs in another dtype than q's, it takes a few key/value heads (with their query heads) at a time,
# so that the converted copies and the kernel's float32 work space stay small: at most this many bytes of q per call
# (at least one key/value head). A call's peak is about 11 times its q here: one head of 16384 tokens in float32 (4 MiB
# of q) peaked 45 MiB above its bf16 inputs; all 8 heads at once, 343 MiB against bf16's own kernel's 155 MiB.
CONVERT_BYTES = 2 << 20


class _KeptCausalFlash(torch.autograd.Function):
    """Causal attention through the CPU flash kernel whose output and log-sum-exp, the two things its
    backward needs besides q, k and v, are kept through a checkpointed region (`layers.kept_outputs`, as the
    4-bit layers keep theirs, but before them and up to the unshrunk budget at any length): the region's
    recompute then skips the attention forward, a quarter of the attention's work in a checkpointed step.
    The kernel runs in `dtype` (`dispatch.training_attention_dtype`:
    float32 for bfloat16 inputs where this CPU's float32 GEMM is the faster, 1.3-1.9x faster here), q, k and v
    converted on the way in a few heads at a time (`CONVERT_BYTES`), forward and backward; what is saved and
    kept stays in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, scale, module, dtype):
        forward, _ = _flash_cpu()
        region = kept_outputs.current()
        out = lse = None
        if region is not None and region.replaying:  # both entries are taken, kept or not, to stay in order
            out, lse = region.take(module), region.take(module)
        if out is None or lse is None:
            chunks = _head_chunks(q, k, dtype)
            if len(chunks) == 1:
                out, lse = forward(*_flash_inputs(q, k, v, dtype), 0.0, True, scale=scale)
                out = out.to(q.dtype)
            else:  # each chunk's output rounded into place at once: one chunk's float32 copies alive at a time
                groups = q.shape[1] // k.shape[1]
                out = torch.empty_like(q)
                lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
                for h0, h1 in chunks:
                    o, l_ = forward(*_flash_inputs(q, k, v, dtype, (h0, h1)), 0.0, True, scale=scale)
                    out[:, h0 * groups:h1 * groups], lse[:, h0 * groups:h1 * groups] = o, l_
                    del o, l_
            if region is not None and not region.replaying:
                region.keep(module, out, kept_outputs.ATTENTION)
                region.keep(module, lse, kept_outputs.ATTENTION)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.dtype = scale, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        _, backward = _flash_cpu()
        dtype = ctx.dtype
        groups = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for h0, h1 in _head_chunks(q, k, dtype):
            g0, g1 = h0 * groups, h1 * groups  # their query heads
            gq, gk, gv = backward(grad_out[:, g0:g1].to(dtype).contiguous(), *_flash_inputs(q, k, v, dtype, (h0, h1)),
                                  out[:, g0:g1].to(dtype), lse[:, g0:g1], 0.0, True, scale=ctx.scale)
            if groups > 1:  # each kv head's gradient is the sum over the query heads that share it
                gk = gk.unflatten(1, (h1 - h0, groups)).sum(2)
                gv = gv.unflatten(1, (h1 - h0, groups)).sum(2)
            dq[:, g0:g1], dk[:, h0:h1], dv[:, h0:h1] = gq, gk, gv
        return dq, dk, dv, None, None, None


def _head_chunks(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> list[tuple[int, int]]:
    """The key/value heads [h0, h1) the flash kernel takes per call: all at once where it runs in q's dtype
    (nothing converted), else as many as keep a call's q in `dtype` within `CONVERT_BYTES`."""
    kv_heads = k.shape[1]
    if dtype == q.dtype:
        return [(0, kv_heads)]
    per_head = q[:, : q.shape[1] // kv_heads].numel() * torch.finfo(dtype).bits // 8
    step = max(1, min(kv_heads, CONVERT_BYTES // max(per_head, 1)))
    return [(h, min(h + step, kv_heads)) for h in range(0, kv_heads, step)]


def _flash_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, heads=None):
    """q, k and v of key/value heads `heads` ([h0, h1), default all) and their query heads in `dtype`, keys and
    values repeated to the query heads (grouped-query attention), as the CPU flash kernel takes them."""
    if heads is not None:
        groups = q.shape[1] // k.shape[1]
        (h0, h1) = heads
        q, k, v = q[:, h0 * groups:h1 * groups], k[:, h0:h1], v[:, h0:h1]
    return q.to(dtype), _heads(k.to(dtype), q), _heads(v.to(dtype), q)


def _heads(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Keys or values repeated to the query heads (grouped-query attention), as the CPU flash kernel takes them."""
    groups = q.shape[1] // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, 1)


def _keeps_causal_flash(module, query, key, dropout: float) -> bool:
    """Whether a plain causal attention goes through `_KeptCausalFlash`: training on CPU, inside a region
    that keeps outputs or with the products in another dtype than q's (`dispatch.training_attention_dtype`),
    no dropout, as many queries as keys, not compiling."""
    return (query.device.type == "cpu" and not dropout and torch.is_grad_enabled() and query.shape[2] == key.shape[2] > 1
            and not torch.compiler.is_compiling() and _flash_cpu() is not None
            and query.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (kept_outputs.current() is not None or dispatch.training_attention_dtype(query) != query.dtype))


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                   use_vmap: bool = False, device="cpu", **kwargs):
    """transformers' mask for `nf4tune_chunked` (an `AttentionMaskInterface` function): `sdpa`'s below
    `LONG_TOKENS` query tokens, else a `BlockwiseMask`."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    mask_function = causal_mask_function if mask_function is None else mask_function
    if q_length < LONG_TOKENS:
        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, use_vmap=use_vmap, device=device, **kwargs)
    padding = attention_mask
    if padding is not None and padding.shape[-1] == kv_length and bool(padding.all()):
        padding = None
    offsets = isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor) or q_offset or kv_offset
    plain = mask_function is causal_mask_function and padding is None and not offsets and q_length == kv_length
    return BlockwiseMask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, padding, use_vmap,
                         torch.device(device), plain)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention function for `nf4tune_chunked` (an `AttentionInterface` function): returns
    (output (b, s, heads, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    softcap = kwargs.get("softcap")
    blockwise = isinstance(attention_mask, BlockwiseMask)
    plain = attention_mask.plain_causal if blockwise else attention_mask is None
    if (softcap is None and plain and kwargs.get("is_causal", getattr(module, "is_causal", True))
            and _keeps_causal_flash(module, query, key, dropout)):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        dtype = dispatch.training_attention_dtype(query)
        return _KeptCausalFlash.apply(query, key, value, scale, module, dtype).transpose(1, 2).contiguous(), None
    if softcap is None and (not blockwise or attention_mask.plain_causal):
        # SDPA's own path: fused kernels, and with a plain causal mask none materialized (is_causal)
        return sdpa_attention_forward(module, query, key, value, None if blockwise else attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout on masked or soft-capped long sequences; set the model's "
                         "attention_dropout to 0 (or train shorter sequences).")
    if attention_mask is None and query.shape[2] > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True)):
        attention_mask = _CausalBlocks(key.shape[2] - query.shape[2], query.device)
    dtype = dispatch.training_attention_dtype(query) if torch.is_grad_enabled() else query.dtype
    if softcap is None:  # a masked long sequence: the fused kernel a block of queries at a time
        out = blocked_sdpa(query, key, value, attention_mask, scaling, dtype=dtype)
    else:  # soft-capped scores, which no fused kernel computes: the online softmax
        out = chunked_attention(query, key, value, attention_mask, scaling, softcap, BLOCK, dtype)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `nf4tune_chunked` with transformers (idempotent); returns the name to select it by."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    return NAME


__all__ = ["BLOCK", "LONG_TOKENS", "NAME", "BlockwiseMask", "attention_forward", "attention_mask", "blocked_sdpa",
           "chunked_attention", "register"]
