"""`Decoder`: decoding of a 4-bit decoder-family model on CPU, one or a few sequences at a time,
without transformers' forward: `runtime.step.ModelStep`'s block over a right-aligned KV cache.

A decoded token is a few dozen small operations per layer. Through transformers each is a PyTorch
op with microseconds of fixed cost, and its bf16 attention for one query costs 100-400 us per layer
on CPU; together they took longer than reading the weights (BENCHMARKS.md). Here a step is the
model step (`runtime/step.py`) with each projection through its `Linear4bit`'s fused kernel and
`infer` (bias and unmerged LoRA included, so `AdapterBank` switches apply), and attention as one
native call for rotary + KV-cache write + attention (`dispatch.decode_attention`; Gemma 2's
soft-capped layers in PyTorch). The residual stream stays in float32, the KV cache in bfloat16.

Prompts are prefilled layer by layer (`runtime.step.prefill`), each weight dequantized once for all of
them and multiplied by BLAS, each prompt apart so that batching never changes its tokens; each row's
cache is right-aligned and it attends from its first token on. `Decoder.run` batches continuously
(`serve.batching`): sequences join a running batch between steps, each prefilled into the place a
finished one left, with its own sampling settings and (through `AdapterBank.rows`) its own adapter;
`generate` is `run` over a fixed batch. `Decoder.unsupported(model)` says why a model cannot use it (another family or
device, no decode-attention kernel: `nf4tune.dispatch`); callers then keep `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .. import dispatch
from ..runtime.step import ModelStep, attention, prefill, rotate
from .batching import Row, continuous_batching, generate_rows
from .sampling import Sampling


class Decoder:
    """Greedy or sampled decoding with a KV cache for a 4-bit model, one or a few sequences at a
    time (see the module doc).

        decoder = Decoder(model)
        [tokens] = decoder.generate(input_ids, Sampling(max_new_tokens=64), eos_ids={2})
    """

    def __init__(self, model):
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"Decoder cannot run this model: {reason}.")
        self.model, self.config = model, model.config
        self.runtime = ModelStep(model)
        self.heads, self.kv_heads, self.head_dim = self.runtime.heads, self.runtime.kv_heads, self.runtime.head_dim
        self.hidden = self.runtime.hidden
        self.kernels = {id(m): m.fused_matmul(torch.zeros(1, m.in_features, dtype=torch.bfloat16))
                        for layer in self.runtime.layers for m in layer.proj.values()}
        self.adapters = None  # per-row adapters (`AdapterBank.rows`) while `run` runs, or a caller's
        self.keys = self.values = None

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `Decoder` cannot decode `model`, or None when it can."""
        reason = ModelStep.unsupported(model)
        if reason:
            return reason
        if any(p.device.type != "cpu" for p in model.parameters()) or any(b.device.type != "cpu" for b in model.buffers()):
            return "the model is not on the CPU"
        attention_path = dispatch.path("decode_attention", torch.zeros(1))
        if not attention_path.fast:
            return f"it needs the AVX-512 CPU kernels ({attention_path.reason})"
        for layer in model.model.layers:
            for module in list(layer.self_attn.children()) + list(layer.mlp.children()):
                if hasattr(module, "fused_matmul") and module.fused_matmul(
                        torch.zeros(1, module.in_features, dtype=module.compute_dtype)) is None:
                    return "its 4-bit layers have no fused CPU kernel"
        return None

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernels[id(module)]
        return module.infer(x, kernel) if self.adapters is None else self.adapters.infer(module, x, kernel)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, capacity: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts (B, T; left-padded where `attention_mask` has zeros) through the model, keep
        their keys and values in a cache with room for `capacity` positions (each row's right-aligned
        at slot T), and return each row's last logits (B, vocab) in float32."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(-1)
        if int(lengths.min()) == 0:
            raise ValueError("a prompt is empty")
        shape = (len(self.runtime.layers), batch, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.empty(shape, dtype=torch.bfloat16)  # slots before a row's first are never read
        self.values = torch.empty(shape, dtype=torch.bfloat16)
        self.runtime.reserve_rope(capacity)
        self.slot = length  # where the next token's keys go, the same for every row
        self.padding = length - lengths  # rows' first slots
        self.positions = lengths.clone()  # rows' next rotary positions
        return self._prefill_into([(b, input_ids[b, attention_mask[b].bool()]) for b in range(batch)], length)

    def _prefill_into(self, prompts: list[tuple[int, torch.Tensor]], end: int) -> torch.Tensor:
        return prefill(self.runtime, prompts, self.keys, self.values, lambda _: end, self.adapters)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (B,); return their logits (B, vocab) in float32."""
        if self.slot >= self.keys.shape[3]:
            raise ValueError(f"the KV cache holds {self.keys.shape[3]} positions; prefill with a larger capacity")
        rt = self.runtime
        x = rt.embed(tokens)
        ropes = rt.ropes(self.positions)
        self._starts = {w: self.padding if w is None else self.padding.clamp(min=self.slot + 1 - w)
                        for w in {layer.window for layer in rt.layers}}
        self._out = torch.empty(tokens.shape[0], self.heads * self.head_dim, dtype=torch.bfloat16)
        for layer in rt.layers:
            rt.block(x, layer, ropes, self, self._linear)
        self.slot += 1
        self.positions += 1
        return rt.logits(rt.final(x))

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
        """The step's attention for layer `layer` (see `runtime.step`): the native kernel writes k and v at
        the slot and attends from each row's first slot; Gemma 2's soft-capped layers go through PyTorch."""
        i, starts, batch = layer.index, self._starts[layer.window], q.shape[0]
        if layer.softcap is None:
            if rope is None:  # rotated already, or no rotary: the kernel rotates by angle 0
                rope = (torch.ones(batch, self.head_dim), torch.zeros(batch, self.head_dim))
            return dispatch.decode_attention(q, k, v, *rope, self.keys[i], self.values[i], self.slot, starts,
                                             layer.scale, self._out)
        q, k, v = (t.view(batch, -1, self.head_dim) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        self.keys[i, :, :, self.slot] = k
        self.values[i, :, :, self.slot] = v
        index = torch.arange(self.slot + 1)[None]
        mask = (index >= starts[:, None])[:, None, None, :]
        attended = attention(q[:, :, None], self.keys[i, :, :, :self.slot + 1], self.values[i, :, :, :self.slot + 1],
                             mask, layer.scale, layer.softcap)
        return attended.reshape(batch, -1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling], eos_ids: set[int] = frozenset(),
                 attention_mask: torch.Tensor | None = None,
                 on_step: Callable[[list[int]], Iterable[int] | None] | None = None,
                 adapters=None) -> list[list[int]]:
        """Up to `max_new_tokens` tokens after each prompt of `input_ids` (B, T; left-padded where
        `attention_mask` has zeros), each row stopping after an end-of-sequence token.

        `sampling`: one for every row, or one per row. `adapters`: None (the layers' own adapters), or
        per-row adapters (`AdapterBank.rows`) applied unmerged, each row with its own. `on_step` sees each
        step's tokens, one per row (rows that have stopped repeat their last token); the rows it returns
        stop there (a client that went away)."""
        return generate_rows(self, input_ids, sampling, eos_ids, attention_mask, on_step, adapters)

    # --- continuous batching ------------------------------------------------------------------

    @torch.no_grad()
    def run(self, admit: Callable[[int], list[Row]], on_step: Callable[[list[Row | None], list[int]], Iterable[int] | None],
            eos_ids: set[int] = frozenset(), adapters=None, on_failed: Callable[[Row], None] | None = None) -> None:
        """Continuous batching: between steps, `admit(live)` (told how many rows are live) hands over new
        rows, which are prefilled into the places of rows that ended (or new ones) and decode from the
        next step on beside the others; each step draws every live row's next token (row.logits, its own
        settings and generator), `on_step(rows, tokens)` sees them and returns the places of rows that end
        there. `adapters` (`AdapterBank.rows([])`): each row under its own adapter. Returns once no row is
        live and `admit` gives none. A row's tokens are bit for bit what it gets alone (`generate`).
        `on_failed(row)`: see `continuous_batching` (a row whose prefill or draw fails ends alone)."""
        live: list[Row | None] = []
        self.keys = self.values = None
        self.slot, self.padding, self.positions = 0, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        self.adapters = adapters

        def retire(place: int) -> None:
            if adapters is not None:  # an idle place computes no adapter
                adapters.assign(place, None)

        def step(tokens: list[int]) -> Iterable[tuple[int, torch.Tensor]]:
            self._trim(live, adapters)
            idle = [place for place, r in enumerate(live) if r is None]
            if idle:  # places without a row attend to their own token only, at position 0
                self.padding[idle], self.positions[idle] = self.slot, 0
            logits = self.step(torch.tensor(tokens[:len(live)]))
            return [(place, logits[place] if adapters is None else adapters.own_vocab(logits[place], r.adapter))
                    for place, r in enumerate(live) if r is not None]

        try:
            continuous_batching(live, admit, on_step, eos_ids, lambda new: self._admit(live, new, adapters), retire, step,
                                on_failed)
        finally:
            self.adapters = None
            self.keys = self.values = None

    def _trim(self, live: list[Row | None], adapters) -> None:
        """Drop idle places at the end of the batch (views: each layer's first rows stay where they are)."""
        rows = len(live)
        while live and live[-1] is None:
            live.pop()
        if len(live) < rows:
            self.keys, self.values = self.keys[:, :len(live)], self.values[:, :len(live)]
            self.padding, self.positions = self.padding[:len(live)], self.positions[:len(live)]
            if adapters is not None:
                adapters.trim(len(live))

    def _admit(self, live: list[Row | None], new: list[Row], adapters) -> None:
        """Give each new row a place (one a finished row left, else a new one), room in the cache, and
        its prompt's keys and values right-aligned before the current slot."""
        free = [place for place, r in enumerate(live) if r is None]
        places = (free + list(range(len(live), len(live) + len(new))))[: len(new)]
        live.extend([None] * (max(places) + 1 - len(live)))
        need = max([r.sampling.max_new_tokens for r in new] + [r.remaining for r in live if r is not None]) + 1
        self._make_room(len(live), max(len(r.prompt_ids) for r in new), need, [r is not None for r in live])
        for place, r in zip(places, new):
            live[place] = r
            if adapters is not None:
                adapters.assign(place, r.adapter)
            self.padding[place], self.positions[place] = self.slot - len(r.prompt_ids), len(r.prompt_ids)
        self.runtime.reserve_rope(max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in new) + 1)
        prompts = [(place, torch.tensor(r.prompt_ids, dtype=torch.long)) for place, r in zip(places, new)]
        for r, logits in zip(new, self._prefill_into(prompts, self.slot)):
            r.logits = logits if adapters is None else adapters.own_vocab(logits, r.adapter)

    def _make_room(self, rows: int, front: int, need: int, live: list[bool]) -> None:
        """A cache of at least `rows` rows with `front` slots before the next one and `need` from it on.
        When it must grow, it is allocated anew with the live rows' keys and values moved left past
        what no live row reads (so a batch that never empties does not grow without end)."""
        batch = self.keys.shape[1] if self.keys is not None else 0
        capacity = self.keys.shape[3] if self.keys is not None else 0
        if rows <= batch and front <= self.slot and self.slot + need <= capacity:
            return
        first = min((int(self.padding[p]) for p, alive in enumerate(live) if alive and p < batch), default=self.slot)
        used = self.slot - first
        slot = max(used, front)
        rows = max(rows, batch)
        shape = (len(self.runtime.layers), rows, self.kv_heads, slot + need, self.head_dim)
        keys, values = torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)
        if used and batch:
            keys[:, :batch, :, slot - used:slot] = self.keys[:, :, :, first:self.slot]
            values[:, :batch, :, slot - used:slot] = self.values[:, :, :, first:self.slot]
        padding, positions = torch.full((rows,), slot, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
        padding[:batch] = (self.padding + slot - self.slot).clamp(min=slot - used)
        positions[:batch] = self.positions
        self.keys, self.values, self.slot, self.padding, self.positions = keys, values, slot, padding, positions
