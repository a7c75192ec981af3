"""Tail logits through nf4tune's model step (`runtime.step.ModelStep`, as the decoders prefill), with
shared prefixes run once and many sequences packed into one pass.

Multiple-choice prompts of one subject share their description and few-shot examples (some 200 of
230 tokens in 5-shot MMLU). Here sequences are grouped by the tokens they start with; a pass holds
several groups, each as its prefix's tokens once followed by every member's own tail. The pass goes
layer by layer as the decoders prefill (only the cache, `_PackedCache`, is this module's): each 4-bit
weight dequantized once for the whole pass and multiplied with all of its rows by one GEMM (bf16), the
residual stream in float32, rotary in float32. Attention is per group: the prefix causally, then each
tail (padded into a batch, shortest neighbours together) to the prefix's keys and to its own earlier
tokens. Only the positions whose logits are asked for reach the output head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..runtime.step import ModelStep, attention, causal_mask, dequantized, gemm, rotate
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


class _PackedCache:
    """Attention for a packed pass (see the module doc): per part, the prefix causally, then each tail to
    the prefix's keys and its own earlier tokens. `layout`: per part (prefix start, prefix length,
    [(sequence index, tail start, tail length)]); `masks`: per window, per part (prefix mask, tails' mask)."""

    def __init__(self, head_dim: int, layout, masks: dict):
        self.head_dim, self.layout, self.masks = head_dim, layout, masks

    def attend(self, layer, q, k, v, rope) -> torch.Tensor:
        n = q.shape[0]
        q, k, v = (t.view(n, -1, self.head_dim) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        attended = torch.empty_like(q)
        for (start, p, rows), (prefix_mask, tail_mask) in zip(self.layout, self.masks[layer.window]):
            pk, pv = k[start:start + p].transpose(0, 1), v[start:start + p].transpose(0, 1)  # (kv, p, D)
            if p:
                pq = q[start:start + p].transpose(0, 1)[None]
                if prefix_mask is None and layer.softcap is not None:
                    prefix_mask = causal_mask(torch.arange(p), torch.arange(p), None)
                a = attention(pq, pk[None], pv[None], prefix_mask, layer.scale, layer.softcap)
                attended[start:start + p] = a[0].transpose(0, 1)
            t = tail_mask.shape[2]
            lengths = torch.tensor([length for _, _, length in rows])
            firsts = torch.tensor([first for _, first, _ in rows])
            index = firsts[:, None] + torch.minimum(torch.arange(t)[None], lengths[:, None] - 1)  # (B, T)
            tq = q[index].transpose(1, 2)  # (B, heads, T, D)
            tk, tv = (torch.cat([pt[None].expand(len(rows), -1, -1, -1), s[index].transpose(1, 2)], 2)
                      for pt, s in ((pk, k), (pv, v)))
            a = attention(tq, tk, tv, tail_mask, layer.scale, layer.softcap).transpose(1, 2)
            valid = torch.arange(t)[None] < lengths[:, None]
            attended[index[valid]] = a[valid]
        return attended.view(n, -1)


class PackedScorer:
    """Runs passes of packed parts through a model `Decoder` supports (a bf16 4-bit decoder family on CPU)."""

    def __init__(self, model):
        from ..serve.decoder import Decoder

        reason = Decoder.unsupported(model)  # where the decoder runs, its prefill arithmetic does too
        if reason:
            raise ValueError(f"PackedScorer cannot run this model: {reason}.")
        self.step = ModelStep(model)
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
        step = self.step
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
        x = step.embed(torch.tensor(ids))  # (N, hidden), updated in place
        ropes = step.ropes(torch.tensor(positions))
        masks = {w: [self._masks(p, rows, w) for (_, p, rows) in layout] for w in {layer.window for layer in step.layers}}
        cache = _PackedCache(step.head_dim, layout, masks)
        buffers: dict[str, torch.Tensor] = {}  # the dequantized weights' memory, reused layer after layer
        for layer in step.layers:
            step.block(x, layer, ropes, cache, gemm(dequantized(layer, buffers)))
        wanted = [(i, start + length - keep[i], keep[i]) for _, _, rows in layout for i, start, length in rows]
        index = torch.tensor([r for _, first, k in wanted for r in range(first, first + k)])
        logits = step.logits(step.final(x[index]))
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
                prefix_mask = causal_mask(torch.arange(p), torch.arange(p), window)
        return prefix_mask, mask[:, None]
