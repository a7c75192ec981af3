"""Tail logits through nf4tune's CPU prefill (`serve.decoder.Decoder`'s layer arithmetic), with
shared prefixes run once and many sequences packed into one pass.

Multiple-choice prompts of one subject share their description and few-shot examples (some 200 of
230 tokens in 5-shot MMLU). Here sequences are grouped by the tokens they start with; a pass holds
several groups, each as its prefix's tokens once followed by every member's own tail. The pass goes
layer by layer as `Decoder` prefills: each 4-bit weight dequantized once for the whole pass and
multiplied with all of its rows by one GEMM (bf16), the residual stream in float32, rotary in
float32. Attention is per group: the prefix causally, then each tail (padded into a batch, shortest
neighbours together) to the prefix's keys and to its own earlier tokens. Only the positions whose
logits are asked for reach the output head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import dispatch
from .scoring import MIN_SHARED, common_prefix  # one threshold and one prefix rule for both scorers


@dataclass
class Group:
    """Sequences that start with the same `shared` tokens (0: each runs whole)."""

    shared: int
    members: list[int]


def shared_groups(seqs: Sequence[Sequence[int]], keep: Sequence[int], min_shared: int = MIN_SHARED) -> list[Group]:
    """Group sequences (in sorted order, so one subject's prompts are neighbours) by a common prefix that
    leaves each member at least its kept positions. A member joins while narrowing the prefix costs fewer
    tokens than running the prefix again; a lone sequence whose neighbours share more among themselves
    (a subject with one question) stays alone."""
    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))
    room = [len(s) - k for s, k in zip(seqs, keep)]  # tokens that may be shared
    groups: list[Group] = []
    i = 0
    while i < len(order):
        first = order[i]
        members, shared = [first], room[first]
        j = i + 1
        while j < len(order):
            nxt = order[j]
            c = min(common_prefix(seqs[first], seqs[nxt]), shared, room[nxt])
            if len(members) == 1:
                if c < min_shared:
                    break
                if j + 1 < len(order):
                    after = order[j + 1]
                    if min(common_prefix(seqs[nxt], seqs[after]), room[nxt], room[after]) > c:
                        break
            elif (shared - c) * len(members) >= c:
                break
            shared = c
            members.append(nxt)
            j += 1
        groups.append(Group(shared if len(members) > 1 else 0, members))
        i = j
    return groups


@dataclass
class _Part:
    """One group's share of a pass: its prefix (rows `start`..`start + len(prefix)`), then its tails."""

    prefix: list[int]
    tails: list[tuple[int, list[int]]] = field(default_factory=list)  # (sequence index, its own tokens)

    @property
    def tokens(self) -> int:
        return len(self.prefix) + sum(len(t) for _, t in self.tails)


def plan_passes(seqs: Sequence[Sequence[int]], keep: Sequence[int], budget: int,
                min_shared: int = MIN_SHARED) -> list[list[_Part]]:
    """Passes of at most `budget` tokens (or one sequence, where that is longer), each a list of parts.
    A group that does not fit in one pass carries its prefix into the next. Within a group, tails are
    sorted by length so that the padded attention batches pad little."""
    passes: list[list[_Part]] = [[]]
    used = 0
    for g in shared_groups(seqs, keep, min_shared):
        prefix = list(seqs[g.members[0]][:g.shared])
        part = None
        for i in sorted(g.members, key=lambda i: len(seqs[i])):
            tail = list(seqs[i][g.shared:])
            extra = len(tail) + (len(prefix) if part is None else 0)
            if used and used + extra > budget:
                passes.append([])
                used, part = 0, None
                extra = len(tail) + len(prefix)
            if part is None:
                part = _Part(prefix)
                passes[-1].append(part)
            part.tails.append((i, tail))
            used += extra
    return [p for p in passes if p]


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of t (N, heads, D) with per-row cos/sin (N, D), in float32 (as Decoder's prefill)."""
    t, half = t.float(), t.shape[-1] // 2
    return (t * cos[:, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, None]).to(torch.bfloat16)


class PackedScorer:
    """Runs passes of packed parts through a model `Decoder` supports (bf16 4-bit Llama family on CPU)."""

    def __init__(self, model):
        from ..serve.decoder import Decoder

        self.decoder = Decoder(model)  # its checks, and each layer's norms and projections
        self.model = model

    def tail_logits(self, seqs: Sequence[Sequence[int]], keep: Sequence[int], batch_size: int,
                    on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """As `scoring.tail_logits`: per sequence, the float32 logits of its last `keep[i]` positions.
        A pass holds as many tokens as `batch_size` of the longest sequences."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        budget = batch_size * max((len(s) for s in seqs), default=1)
        with torch.inference_mode():
            for parts in plan_passes(seqs, keep, budget):
                for i, logits in self._run(parts, keep).items():
                    out[i] = logits
                if on_batch is not None:
                    on_batch(sum(len(p.tails) for p in parts))
        return out  # type: ignore[return-value]

    def _run(self, parts: list[_Part], keep: Sequence[int]) -> dict[int, torch.Tensor]:
        d = self.decoder
        ids, positions, layout = [], [], []  # layout: per part (prefix start, [(index, start, length)])
        for part in parts:
            start = len(ids)
            ids += part.prefix
            positions += range(len(part.prefix))
            rows = []
            for i, tail in part.tails:
                rows.append((i, len(ids), len(tail)))
                ids += tail
                positions += range(len(part.prefix), len(part.prefix) + len(tail))
            layout.append((start, len(part.prefix), rows))
        x = self.model.get_input_embeddings()(torch.tensor(ids)).float()  # (N, hidden), updated in place
        cos, sin = (t[0].float() for t in self.model.model.rotary_emb(torch.zeros(1), torch.tensor(positions)[None]))
        windows = {b.window for b in d.blocks}
        masks = {w: [self._masks(p, rows, w) for (_, p, rows) in layout] for w in windows}
        for block in d.blocks:
            weights = {name: module.dequantized_weight(torch.bfloat16) for name, (module, _) in block.proj.items()}
            self._layer(block, weights, x, cos, sin, layout, masks[block.window])
            del weights
        wanted = [(i, start + length - keep[i], keep[i]) for _, _, rows in layout for i, start, length in rows]
        index = torch.tensor([r for _, first, k in wanted for r in range(first, first + k)])
        h = dispatch.rms_norm(x[index], d.final_norm, d.final_eps)
        logits = self.model.get_output_embeddings()(h).float()
        out, at = {}, 0
        for i, _, k in wanted:
            out[i] = logits[at:at + k]
            at += k
        return out

    @staticmethod
    def _masks(p: int, rows: list[tuple[int, int, int]], window: int | None):
        """(prefix mask or None for plain causal, tails' mask (B, 1, T, p + T)) for one part; True attends."""
        t = max(length for _, _, length in rows)
        q = p + torch.arange(t)[:, None]  # query positions
        k = torch.cat([torch.arange(p), p + torch.arange(t)])[None]  # key positions
        lengths = torch.tensor([length for _, _, length in rows])
        tail_key = torch.arange(p + t)[None] >= p
        mask = (k <= q)[None] & ~(tail_key[None] & (k[None] - p >= lengths[:, None, None]))
        prefix_mask = None
        if window is not None:
            mask &= (q - k < window)[None]
            if p > window:
                offset = torch.arange(p)[:, None] - torch.arange(p)[None]
                prefix_mask = (offset >= 0) & (offset < window)
        return prefix_mask, mask[:, None]

    def _layer(self, block, weights: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               layout, masks) -> None:
        """One decoder layer for all packed rows x (N, hidden; updated in place)."""
        d = self.decoder
        n = x.shape[0]

        def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
            module, w = block.proj[name][0], weights[name]
            return module.infer(inputs, lambda t: t @ w.t())

        h = dispatch.rms_norm(x, block.norm1, block.eps1)
        q = _rotate(project("q_proj", h).view(n, d.heads, d.head_dim), cos, sin)
        k = _rotate(project("k_proj", h).view(n, d.kv_heads, d.head_dim), cos, sin)
        v = project("v_proj", h).view(n, d.kv_heads, d.head_dim)
        attended = torch.empty(n, d.heads, d.head_dim, dtype=torch.bfloat16)
        gqa = d.heads != d.kv_heads  # SDPA shares each key/value head among its query heads
        for (start, p, rows), (prefix_mask, tail_mask) in zip(layout, masks):
            pk, pv = k[start:start + p].transpose(0, 1), v[start:start + p].transpose(0, 1)  # (kv, p, D)
            if p:
                pq = q[start:start + p].transpose(0, 1)[None]
                a = F.scaled_dot_product_attention(pq, pk[None], pv[None], attn_mask=prefix_mask,
                                                   is_causal=prefix_mask is None, scale=block.scale, enable_gqa=gqa)
                attended[start:start + p] = a[0].transpose(0, 1)
            t = tail_mask.shape[2]
            lengths = torch.tensor([length for _, _, length in rows])
            firsts = torch.tensor([first for _, first, _ in rows])
            index = firsts[:, None] + torch.minimum(torch.arange(t)[None], lengths[:, None] - 1)  # (B, T)
            tq = q[index].transpose(1, 2)  # (B, heads, T, D)
            tk, tv = (torch.cat([pt[None].expand(len(rows), -1, -1, -1), s[index].transpose(1, 2)], 2)
                      for pt, s in ((pk, k), (pv, v)))
            a = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tail_mask, scale=block.scale,
                                               enable_gqa=gqa).transpose(1, 2)
            valid = torch.arange(t)[None] < lengths[:, None]
            attended[index[valid]] = a[valid]
        x += project("o_proj", attended.view(n, -1))
        dispatch.rms_norm(x, block.norm2, block.eps2, out=h)
        x += project("down_proj", F.silu(project("gate_proj", h)) * project("up_proj", h))
