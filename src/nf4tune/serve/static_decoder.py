"""`StaticDecoder`: decoding of a 4-bit decoder-family model with a static KV cache and a decoding step
of fixed shapes, for CUDA, where the step is captured once in a CUDA graph and replayed per token.

A decoded token on a GPU is a few hundred tiny kernels; launching them from Python costs more than
running them. Here every tensor the step touches is allocated once (the KV cache for `batch` rows of
`capacity` positions, the rotary table, the inputs), the cache is written in place at each row's slot
held in a tensor, and the step (`runtime.step.ModelStep`'s block over a cache written in place) has no
data-dependent shapes, so it can be:

- `mode="eager"`: run as written (the reference the others are held to);
- `mode="compiled"`: compiled whole by `torch.compile(fullgraph=True)` (Inductor fuses the norms,
  rotary, SwiGLU and residual adds; each 4-bit projection is the `nf4tune::matmul_4bit` custom op:
  on CUDA the Triton few-token kernel, on CPU the AVX-512 one, through `nf4tune.dispatch`);
- `mode="graphs"` (CUDA only): the compiled step captured in a `torch.cuda.CUDAGraph` and replayed.

Adapters stay unmerged (x A^T B^T added in float32). Prompts are prefilled by GEMMs (`prefill`): each
prompt on its own (so batching never changes its tokens), layer by layer, each 4-bit weight
dequantized once for all the prompts admitted together, its keys and values written to its row's
slots 0..T-1; then the step continues each row at its own slot (rows of different lengths need no
padding in the cache). `generate(..., prefill=False)` keeps the first way: the prompts left-padded
and fed through the step a token at a time (the tests hold the prefill to it). Sliding-window layers
attend to their window only.

`run` batches continuously with `serve.decoder.Decoder.run`'s contract, so the serving engine decodes
through either: on CUDA this one (the mode from `nf4tune.dispatch.path("decode", ...)`), on CPU the
native `Decoder`; `StaticDecoder.unsupported(model)` says why a model cannot use it. The cache grows
(a copy; the CUDA graph is captured again) when a request needs more positions than it has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from .. import dispatch
from ..layers.linear4bit import Linear4bit
from ..runtime.step import STATIC_ROPE, ModelStep, attention, prefill, rotate
from .batching import Row, continuous_batching, generate_rows
from .sampling import Sampling

log = logging.getLogger(__name__)

MODES = ("eager", "compiled", "graphs")
# The cache grows in steps of this many positions (a new size recompiles / recaptures the step).
CAPACITY_STEP = 256


def round_capacity(positions: int, context: int | None = None) -> int:
    """`positions` rounded up to a multiple of CAPACITY_STEP, but not past the model's `context`
    (where that still holds `positions`)."""
    rounded = -(-positions // CAPACITY_STEP) * CAPACITY_STEP
    return max(positions, min(rounded, context)) if context else rounded


class _StepCache:
    """The step's view of the static cache: each row's k and v written at its slot, attending from its
    first slot (`masks`, per window)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, masks: dict):
        self.keys, self.values, self.slots, self.masks = keys, values, slots, masks

    def attend(self, layer, q, k, v, rope) -> torch.Tensor:
        batch, kv_heads, _, d = self.keys.shape[1:]
        q, k, v = q.view(batch, -1, d), k.view(batch, -1, d), v.view(batch, -1, d)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        where = self.slots[:, None, None, None].expand(batch, kv_heads, 1, d)
        self.keys[layer.index].scatter_(2, where, k[:, :, None])
        self.values[layer.index].scatter_(2, where, v[:, :, None])
        attended = attention(q[:, :, None], self.keys[layer.index], self.values[layer.index],
                             self.masks[layer.window], layer.scale, layer.softcap)
        return attended.reshape(batch, -1)


class StaticDecoder:
    """Greedy or sampled decoding of up to `batch` rows of at most `capacity` positions each.

        decoder = StaticDecoder(model, batch=1, capacity=512, mode="graphs")
        [tokens] = decoder.generate(input_ids, Sampling(max_new_tokens=64), eos_ids={2})
    """

    def __init__(self, model, batch: int, capacity: int, mode: str = "eager", backend: str = "inductor"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        device = next(model.parameters()).device
        if mode == "graphs" and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a GPU; use mode='compiled' elsewhere")
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"StaticDecoder cannot run this model: {reason}.")
        self.model, self.config, self.device, self.mode = model, model.config, device, mode
        self.runtime = ModelStep(model)
        self.runtime.native = False  # PyTorch arithmetic throughout: eager and compiled steps alike
        self.heads, self.kv_heads, self.head_dim = self.runtime.heads, self.runtime.kv_heads, self.runtime.head_dim
        self.context: int | None = getattr(model.config, "max_position_embeddings", None)
        self.batch = batch
        self.windows = sorted({layer.window for layer in self.runtime.layers}, key=lambda w: (w is not None, w or 0))
        self.capacity = 0
        self.keys = self.values = None
        self._graph = self._graph_out = None
        self.reserve(capacity)
        # the step's inputs, written in place before each call (a CUDA graph reads them from these addresses)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)
        self._step = self._eager_step
        if mode != "eager":
            self._step = torch.compile(self._eager_step, fullgraph=True, backend=backend)

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `StaticDecoder` cannot decode `model`, or None when it can."""
        reason = ModelStep.unsupported(model)
        if reason:
            return reason
        devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        if len(devices) != 1:
            return "the model is spread over several devices"
        rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
        types = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
        if types - set(STATIC_ROPE):
            return f"its rotary embedding ({rope_type}) depends on the sequence length"
        return None

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions per row: a larger cache with the current one's keys and
        values copied to its start, longer rotary tables; the CUDA graph is captured again."""
        if capacity <= self.capacity:
            return
        shape = (len(self.runtime.layers), self.batch, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        values = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        if self.keys is not None:
            keys[..., :self.capacity, :] = self.keys
            values[..., :self.capacity, :] = self.values
        self.keys, self.values = keys, values
        self.runtime.reserve_rope(capacity)
        self.capacity = capacity
        self._graph = self._graph_out = None

    # --- the step -----------------------------------------------------------------------------

    @staticmethod
    def _linear(module: Linear4bit, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) bf16 through the 4-bit layer as the `nf4tune::matmul_4bit` custom op (opaque to
        torch.compile, captured whole by a CUDA graph), bias and unmerged adapter added in float32."""
        weight = module.frozen_weight()
        if isinstance(weight, torch.Tensor):  # an unquantized (16-bit) base
            y = (x @ weight.t()).float()
        else:
            y = dispatch.decode_matmul_4bit(x, module.weight_packed, module.weight_absmax,
                                            module.weight_nested_absmax, module.layout).float()
        if module.bias is not None:
            y = y + module.bias.float()
        if module.lora_A is not None:
            y = y + (x.float() @ module.lora_A.float().t()) @ module.lora_B.float().t() * module.scaling
        return y.to(torch.bfloat16)

    def _eager_step(self, tokens, positions, starts, slots) -> torch.Tensor:
        """Each row's next token in, its logits (B, vocab) float32 out; its keys and values written at
        its slot, attending from its first slot (`starts`) to that one."""
        rt = self.runtime
        x = rt.embed(tokens)
        index = torch.arange(self.capacity, device=tokens.device)[None]
        slot = slots[:, None]
        # a row attends from its first slot to this one (a padding row at least to itself: no empty softmax)
        visible = ((index >= starts[:, None]) & (index <= slot)) | (index == slot)
        masks = {w: (visible if w is None else visible & (index > slot - w))[:, None, None, :] for w in self.windows}
        cache = _StepCache(self.keys, self.values, slots, masks)
        ropes = rt.ropes(positions)
        for layer in rt.layers:
            x = rt.block(x, layer, ropes, cache, self._linear)
        return rt.logits(rt.final(x))
    def _capture(self) -> None:
        """Capture the step in a CUDA graph after warm-up runs on a side stream (compiling, autotuning
        and the kernels' first-use checks happen there, not in the capture). The warm-up writes each
        row's keys and values at its current slot: what the replay that follows writes there again."""
        log.info("nf4tune: capturing the decoding step in a CUDA graph (%d rows, %d positions)", self.batch, self.capacity)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(self.tokens, self.positions, self.starts, self.slots)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._graph_out = self._step(self.tokens, self.positions, self.starts, self.slots)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor,
             slot: int | torch.Tensor) -> torch.Tensor:
        """Feed each row (B = `batch`) its token at rotary position `positions`, writing its keys and
        values at cache slot `slot` (one for all rows, or one per row) and attending to slots
        `starts`..`slot`; returns the logits (B, vocab) float32."""
        last = slot if isinstance(slot, int) else int(slot.max())
        if last >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.starts.copy_(starts)
        if isinstance(slot, int):
            self.slots.fill_(slot)
        else:
            self.slots.copy_(slot)
        if self.mode != "graphs":
            return self._step(self.tokens, self.positions, self.starts, self.slots)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._graph_out.clone()

    # --- the prefill --------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Run each prompt (cache row, ids (T,)) through the model at positions 0..T-1, all its tokens
        at once (`runtime.step.prefill`: GEMMs, a row computed exactly as it would be alone). Its keys and
        values go to its row's slots 0..T-1; returns each prompt's last logits (P, vocab) float32."""
        lengths = [len(ids) for _, ids in prompts]
        if min(lengths) == 0:
            raise ValueError("a prompt is empty")
        if max(lengths) > self.capacity:
            raise ValueError(f"a prompt of {max(lengths)} tokens does not fit the {self.capacity} positions of the cache")
        return prefill(self.runtime, list(prompts), self.keys, self.values, lambda length: length)

    def _prefill_by_step(self, prompts: Sequence[tuple[int, torch.Tensor]], slots: torch.Tensor) -> torch.Tensor:
        """`prefill` through the step a token at a time, each prompt in turn (the step writes the other
        rows' next slot too, which their next step writes again before reading it)."""
        out = []
        for place, ids in prompts:
            where, logits = slots.clone(), None
            for t, token in enumerate(ids.tolist()):
                tokens = torch.zeros(self.batch, dtype=torch.long)
                tokens[place], where[place] = token, t
                logits = self.step(tokens, where, torch.zeros(self.batch, dtype=torch.long), where)
            out.append(logits[place])
        return torch.stack(out)

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling],
                 eos_ids: set[int] = frozenset(), attention_mask: torch.Tensor | None = None,
                 prefill: bool = True) -> list[list[int]]:
        """Up to `max_new_tokens` tokens after each prompt of `input_ids` (B <= batch, T; left-padded
        where `attention_mask` has zeros), each row stopping after an end-of-sequence token (`run` over
        a fixed batch). `prefill=False`: the prompts go through the step a token at a time instead."""
        if input_ids.shape[0] > self.batch:
            raise ValueError(f"{input_ids.shape[0]} prompts for a decoder of {self.batch} rows")
        self._by_step = not prefill
        try:
            return generate_rows(self, input_ids, sampling, eos_ids, attention_mask, None)
        finally:
            self._by_step = False

    # --- continuous batching ------------------------------------------------------------------

    @torch.no_grad()
    def run(self, admit: Callable[[int], list[Row]], on_step: Callable[[list[Row | None], list[int]], Iterable[int] | None],
            eos_ids: set[int] = frozenset(), adapters=None, on_failed: Callable[[Row], None] | None = None) -> None:
        """Continuous batching with `Decoder.run`'s contract: between steps `admit(live)` hands over new
        rows (at most `batch` live in all), each prefilled into a free place of the cache (which grows,
        to `round_capacity` of what a row needs, when a row needs more); each step draws every live
        row's next token (row.logits, its own settings and generator) and `on_step(rows, tokens)`
        returns the places of rows that end there. A row's tokens are what it gets alone (`generate`).
        Per-row adapters (`adapters`) are the CPU decoder's: here the layers' own adapters apply."""
        if adapters is not None:
            raise ValueError("StaticDecoder applies the layers' own adapters; per-row adapters need serve.decoder.Decoder")
        live: list[Row | None] = [None] * self.batch
        slots = torch.zeros(self.batch, dtype=torch.long)  # each place's next slot (= its rotary position)
        starts = torch.zeros(self.batch, dtype=torch.long)

        def retire(place: int) -> None:
            slots[place] = 0  # an idle place decodes token 0 at slot 0, attending to itself

        def step(tokens: list[int]) -> list[tuple[int, torch.Tensor]]:
            tokens = [t if r is not None else 0 for r, t in zip(live, tokens)]
            logits = self.step(torch.tensor(tokens), slots, starts, slots).cpu()
            places = [place for place, r in enumerate(live) if r is not None]
            slots[places] += 1
            return [(place, logits[place]) for place in places]

        continuous_batching(live, admit, on_step, eos_ids, lambda new: self._admit(live, slots, new), retire, step,
                            on_failed)

    def _admit(self, live: list[Row | None], slots: torch.Tensor, new: list[Row]) -> None:
        """Give each new row a free place and its prompt's keys and values (slots 0..T-1)."""
        free = [place for place, r in enumerate(live) if r is None]
        if len(new) > len(free):
            raise ValueError(f"{len(new)} new rows for {len(free)} free places of a decoder of {self.batch} rows")
        self.reserve(round_capacity(max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in new), self.context))
        places = free[:len(new)]
        prompts = [(place, torch.tensor(r.prompt_ids, dtype=torch.long)) for place, r in zip(places, new)]
        first = self._prefill_by_step(prompts, slots) if getattr(self, "_by_step", False) else self.prefill(prompts)
        for place, r, logits in zip(places, new, first.cpu()):
            live[place], r.logits, slots[place] = r, logits, len(r.prompt_ids)
