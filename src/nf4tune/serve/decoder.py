"""`Decoder`: decoding of a 4-bit Llama-family model on CPU, one or a few sequences at a time,
without transformers' forward.

A decoded token is a few dozen small operations per layer. Through transformers each is a PyTorch
op with microseconds of fixed cost, and its bf16 attention for one query costs 100-400 us per layer
on CPU; together they took longer than reading the weights (BENCHMARKS.md). Here a step is, per
layer: RMSNorm, the q/k/v projections, one native call for rotary + KV-cache write + attention,
the output projection, RMSNorm, gate/up, SiLU times up, the down projection. The projections
go through each `Linear4bit`'s fused kernel and `infer` (bias and unmerged LoRA included, so
`AdapterBank` switches apply); norms, rotary and attention are `kernels/cpu_kernels.cpp`. The
residual stream stays in float32, the KV cache in bfloat16.

Prompts are prefilled layer by layer, each weight dequantized once for all of them and multiplied
by BLAS (compute-bound: GEMMs), each prompt apart so that batching never changes its tokens; each
row's cache is right-aligned and it attends from its first token on. `Decoder.run` batches
continuously: sequences join a running batch between steps, each prefilled into the place a finished
one left, with its own sampling settings and (through `AdapterBank.rows`) its own adapter.
`Decoder.unsupported(model)`
says why a model cannot use it (another family or device, no decode-attention kernel: `nf4tune.dispatch`);
callers then keep `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import dispatch
from ..layers.linear4bit import Linear4bit
from ..registry import families
from .sampling import Sampling, next_token

FAMILIES = families("decoder")
# rope types whose angles do not depend on the sequence length (not "dynamic", "longrope")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _window(config, layer: int) -> int | None:
    """How many past positions (itself included) layer `layer` attends to; None: all."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None) if config.model_type == "mistral" else None


def _projection(layer, name: str):
    """One of a decoder layer's seven linear layers, by its transformers name."""
    return getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)


class _Block:
    """One decoder layer's parts, as the step uses them: each projection with its fused CPU kernel."""

    def __init__(self, layer, config, index: int):
        self.norm1 = layer.input_layernorm.weight.detach().float().contiguous()
        self.norm2 = layer.post_attention_layernorm.weight.detach().float().contiguous()
        self.eps1, self.eps2 = layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon
        self.scale = float(layer.self_attn.scaling)
        self.window = _window(config, index)
        self.proj = {}
        for name in PROJECTIONS:
            module = _projection(layer, name)
            self.proj[name] = (module, module.fused_matmul(torch.zeros(1, module.in_features, dtype=torch.bfloat16)))


@dataclass(eq=False)
class Row:
    """One sequence of a continuous batch (`Decoder.run`): its prompt, its settings, what it made."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None
    tag: Any = None  # the caller's (the engine's request)
    out: list[int] = field(default_factory=list)
    done: bool = False
    logits: torch.Tensor | None = None  # the scores its next token is drawn from
    error: Exception | None = None  # why it failed alone (its prefill or its draw), for `on_failed`

    def __post_init__(self):
        self.seen = list(self.prompt_ids)
        self.generator = None if self.sampling.seed is None else torch.Generator().manual_seed(self.sampling.seed)

    @property
    def remaining(self) -> int:
        return self.sampling.max_new_tokens - len(self.out)


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
        config, inner = model.config, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.blocks = [_Block(layer, config, i) for i, layer in enumerate(inner.layers)]
        self.final_norm = inner.norm.weight.detach().float().contiguous()
        self.final_eps = inner.norm.variance_epsilon
        self.adapters = None  # per-row adapters while `generate` runs (see there)
        self.last_logits: torch.Tensor | None = None

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `Decoder` cannot decode `model`, or None when it can."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in FAMILIES:
            return f"it decodes {', '.join(FAMILIES)} models"
        if any(p.device.type != "cpu" for p in model.parameters()) or any(b.device.type != "cpu" for b in model.buffers()):
            return "the model is not on the CPU"
        attention = dispatch.path("decode_attention", torch.zeros(1))
        if not attention.fast:
            return f"it needs the AVX-512 CPU kernels ({attention.reason})"
        if config.hidden_act != "silu":
            return f"it needs SiLU MLPs, not {config.hidden_act}"
        layers = model.model.layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if head_dim % 16 or head_dim > 512 or config.hidden_size % 16:
            return "its head size and hidden size must be multiples of 16 (head size at most 512)"
        for layer in layers:
            for name in PROJECTIONS:
                module = _projection(layer, name)
                if not isinstance(module, Linear4bit):
                    return f"its {name} layers are not 4-bit"
                if module.compute_dtype != torch.bfloat16:
                    return "it computes in bfloat16 (the model computes in another dtype)"
                if module.fused_matmul(torch.zeros(1, module.in_features, dtype=module.compute_dtype)) is None:
                    return f"its {name} layers have no fused CPU kernel"
        return None

    def _project(self, block: _Block, name: str, x: torch.Tensor) -> torch.Tensor:
        module, matmul = block.proj[name]
        return module.infer(x, matmul) if self.adapters is None else self.adapters.infer(module, x, matmul)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, capacity: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts (B, T; left-padded where `attention_mask` has zeros) through the model, keep
        their keys and values in a cache with room for `capacity` positions (each row's right-aligned
        at slot T), and return each row's last logits (B, vocab) in float32.

        Layer by layer, each 4-bit weight is dequantized once and multiplied with every prompt apart:
        a row is computed exactly as it would be alone (a padded batch's GEMMs round differently, so
        batching could flip a near-tie), and no padding is computed."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(-1)
        if int(lengths.min()) == 0:
            raise ValueError("a prompt is empty")
        shape = (len(self.blocks), batch, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.empty(shape, dtype=torch.bfloat16)  # slots before a row's first are never read
        self.values = torch.empty(shape, dtype=torch.bfloat16)
        self.rope_table = None
        self._ensure_rope(capacity)
        self.slot = length  # where the next token's keys go, the same for every row
        self.padding = length - lengths  # rows' first slots
        self.positions = lengths.clone()  # rows' next rotary positions
        return self._prefill_into([(b, input_ids[b, attention_mask[b].bool()]) for b in range(batch)], length)

    def _ensure_rope(self, positions: int) -> None:
        """A table of rotary angles for positions 0..positions-1, where they do not depend on the length."""
        rotary = self.model.model.rotary_emb
        if getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
            self.rope_table = None
            return
        if self.rope_table is None or self.rope_table[0].shape[0] < positions:
            cos, sin = rotary(torch.zeros(1), torch.arange(positions)[None])
            self.rope_table = (cos[0], sin[0])

    def _prefill_into(self, prompts: list[tuple[int, torch.Tensor]], end: int) -> torch.Tensor:
        """Run each prompt (cache row, ids (T,)) through the model layer by layer, each 4-bit weight
        dequantized once for all of them; write their keys and values to their rows, ending before slot
        `end`; return their last logits (P, vocab) in float32."""
        embed = self.model.get_input_embeddings()
        rows = [embed(ids).float() for _, ids in prompts]  # (T_b, hidden)
        ropes = [self._rope(torch.arange(len(ids))) for _, ids in prompts]
        for i, block in enumerate(self.blocks):
            weights = {name: module.dequantized_weight(torch.bfloat16) for name, (module, _) in block.proj.items()}
            for (row, _), x, rope in zip(prompts, rows, ropes):
                self._prefill_layer(i, block, weights, row, x, *rope, end)
            del weights
        last = torch.stack([x[-1] for x in rows])
        h = dispatch.rms_norm(last, self.final_norm, self.final_eps)
        return self.model.get_output_embeddings()(h).float()

    def _prefill_layer(self, i: int, block: _Block, weights: dict, row: int, x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, length: int) -> None:
        """Layer i for one prompt's hidden states x (T, hidden; updated in place), its cache written."""
        tokens = x.shape[0]

        def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
            module, w = block.proj[name][0], weights[name]
            if self.adapters is not None:  # this prompt's own adapter
                return self.adapters.infer(module, inputs, lambda t: t @ w.t(), rows=[row])
            return module.infer(inputs, lambda t: t @ w.t())

        def rotate(t: torch.Tensor) -> torch.Tensor:  # (T, heads, D): rotate-half rotary, in float32
            t, half = t.float(), t.shape[-1] // 2
            return (t * cos[:, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, None]).to(torch.bfloat16)

        h = dispatch.rms_norm(x, block.norm1, block.eps1)
        q = rotate(project("q_proj", h).view(tokens, self.heads, self.head_dim))
        k = rotate(project("k_proj", h).view(tokens, self.kv_heads, self.head_dim))
        v = project("v_proj", h).view(tokens, self.kv_heads, self.head_dim)
        self.keys[i, row, :, length - tokens:length] = k.transpose(0, 1)
        self.values[i, row, :, length - tokens:length] = v.transpose(0, 1)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        if block.window is not None and tokens > block.window:
            offset = torch.arange(tokens)[:, None] - torch.arange(tokens)[None]
            mask = (offset >= 0) & (offset < block.window)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.scale)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.scale)
        x += project("o_proj", attended[0].transpose(0, 1).reshape(tokens, -1))
        dispatch.rms_norm(x, block.norm2, block.eps2, out=h)
        x += project("down_proj", F.silu(project("gate_proj", h)) * project("up_proj", h))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (len(positions), head_dim), float32."""
        if self.rope_table is not None:
            return self.rope_table[0][positions].contiguous(), self.rope_table[1][positions].contiguous()
        cos, sin = self.model.model.rotary_emb(torch.zeros(1), positions[None])
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (B,); return their logits (B, vocab) in float32."""
        slot = self.slot
        if slot >= self.keys.shape[3]:
            raise ValueError(f"the KV cache holds {self.keys.shape[3]} positions; prefill with a larger capacity")
        batch = tokens.shape[0]
        x = self.model.get_input_embeddings()(tokens).float()
        cos, sin = self._rope(self.positions)
        starts = {w: self.padding if w is None else self.padding.clamp(min=slot + 1 - w)
                  for w in {block.window for block in self.blocks}}
        h = torch.empty(batch, self.hidden, dtype=torch.bfloat16)
        attended = torch.empty(batch, self.heads * self.head_dim, dtype=torch.bfloat16)
        for i, block in enumerate(self.blocks):
            dispatch.rms_norm(x, block.norm1, block.eps1, out=h)
            q, k, v = (self._project(block, name, h).contiguous() for name in PROJECTIONS[:3])
            dispatch.decode_attention(q, k, v, cos, sin, self.keys[i], self.values[i], slot, starts[block.window],
                                      block.scale, attended)
            x += self._project(block, "o_proj", attended)
            dispatch.rms_norm(x, block.norm2, block.eps2, out=h)
            act = F.silu(self._project(block, "gate_proj", h)) * self._project(block, "up_proj", h)
            x += self._project(block, "down_proj", act)
        dispatch.rms_norm(x, self.final_norm, self.final_eps, out=h)
        self.slot += 1
        self.positions += 1
        return self.model.get_output_embeddings()(h).float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling], eos_ids: set[int] = frozenset(),
                 attention_mask: torch.Tensor | None = None,
                 on_step: Callable[[list[int]], Iterable[int] | None] | None = None,
                 adapters=None) -> list[list[int]]:
        """Up to `max_new_tokens` tokens after each prompt of `input_ids` (B, T; left-padded where
        `attention_mask` has zeros), each row stopping after an end-of-sequence token.

        `sampling`: one for every row, or one per row. `adapters`: None (the layers' own adapters), or
        per-row adapters (`AdapterBank.rows`) applied unmerged, each row with its own. `on_step` sees each
        step's tokens, one per row (rows that have stopped repeat their last token), with their logits
        in `self.last_logits`; the rows it returns stop there (a client that went away)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {list(input_ids.shape)}")
        rows = input_ids.shape[0]
        samplings = [sampling] * rows if isinstance(sampling, Sampling) else list(sampling)
        if len(samplings) != rows:
            raise ValueError(f"{len(samplings)} sampling settings for {rows} rows")
        # one generator per row: a seeded request draws the same tokens alone or batched
        generators = [None if s.seed is None else torch.Generator().manual_seed(s.seed) for s in samplings]
        seen = [ids[mask.bool()].tolist() for ids, mask in
                zip(input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids))]
        self.adapters = adapters
        try:
            logits = self.prefill(input_ids, input_ids.shape[1] + max(s.max_new_tokens for s in samplings), attention_mask)
            out: list[list[int]] = [[] for _ in range(rows)]
            done = [False] * rows
            while True:
                step = []
                for row, s in enumerate(samplings):
                    if done[row]:
                        step.append(out[row][-1] if out[row] else 0)
                        continue
                    penalized = torch.tensor(seen[row]) if s.repetition_penalty != 1.0 else None
                    token = next_token(logits[row], s, penalized, generators[row], out[row])
                    out[row].append(token)
                    seen[row].append(token)
                    done[row] = token in eos_ids or len(out[row]) >= s.max_new_tokens
                    step.append(token)
                self.last_logits = logits
                if on_step is not None:
                    for row in on_step(step) or ():
                        done[row] = True
                if all(done):
                    return out
                logits = self.step(torch.tensor(step))
        finally:
            self.adapters = None

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
        self.keys = self.values = self.rope_table = None
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

    @staticmethod
    def _draw(row: Row, eos_ids: set[int]) -> int:
        s = row.sampling
        penalized = torch.tensor(row.seen) if s.repetition_penalty != 1.0 else None
        token = next_token(row.logits, s, penalized, row.generator, row.out)
        row.out.append(token)
        row.seen.append(token)
        row.done = token in eos_ids or len(row.out) >= s.max_new_tokens
        return token

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
        self._ensure_rope(max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in new) + 1)
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
        shape = (len(self.blocks), rows, self.kv_heads, slot + need, self.head_dim)
        keys, values = torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)
        if used and batch:
            keys[:, :batch, :, slot - used:slot] = self.keys[:, :, :, first:self.slot]
            values[:, :batch, :, slot - used:slot] = self.values[:, :, :, first:self.slot]
        padding, positions = torch.full((rows,), slot, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
        padding[:batch] = (self.padding + slot - self.slot).clamp(min=slot - used)
        positions[:batch] = self.positions
        self.keys, self.values, self.slot, self.padding, self.positions = keys, values, slot, padding, positions


def continuous_batching(live: list[Row | None], admit: Callable[[int], list[Row]],
                        on_step: Callable[[list[Row | None], list[int]], Iterable[int] | None], eos_ids: set[int],
                        place_new: Callable[[list[Row]], None], retire: Callable[[int], None],
                        step: Callable[[list[int]], Iterable[tuple[int, torch.Tensor]]],
                        on_failed: Callable[[Row], None] | None = None) -> None:
    """The loop both decoders run (`Decoder.run`, `StaticDecoder.run`); they differ in how they hold the
    cache. Between steps `admit(live count)` hands over rows and `place_new(rows)` puts them in `live`
    with their first logits; every live row draws its next token; `on_step(live, tokens)` returns the
    places that end there, which `retire(place)` frees; `step(tokens)` advances the cache one token
    and returns (place, logits) for each live row. Returns once no row is live and `admit` gives none.

    One row's failure is its own: a row whose prompt cannot be prefilled, or whose next token cannot be
    drawn (its settings or its logits give no distribution), leaves the batch before `on_step` sees the
    step, with the exception in `row.error`, and `on_failed(row)` is told; the other rows go on exactly
    as if it had ended there (each row's arithmetic is its own, so their tokens do not change). Without
    `on_failed` such a failure is raised. A failure of the shared step is every row's, and is raised."""
    def fail(row: Row, error: Exception) -> None:
        if on_failed is None:
            raise error
        row.error, row.done = error, True
        on_failed(row)

    while True:
        new = admit(sum(r is not None for r in live))
        if new:
            _place_each(live, new, place_new, retire, fail)
        if not any(live):
            return
        tokens = []
        for place, row in enumerate(live):
            token = 0
            if row is not None:
                try:
                    token = Decoder._draw(row, eos_ids)
                except Exception as e:  # this row's settings or logits: it leaves, the others draw on
                    live[place] = None
                    retire(place)
                    fail(row, e)
            tokens.append(token)
        for place in on_step(live, tokens) or ():
            live[place].done = True
        for place, r in enumerate(live):
            if r is not None and r.done:
                live[place] = None
                retire(place)
        if not any(live):
            continue
        for place, logits in step(tokens):
            live[place].logits = logits


def _place_each(live: list[Row | None], new: list[Row], place_new: Callable[[list[Row]], None],
                retire: Callable[[int], None], fail: Callable[[Row, Exception], None]) -> None:
    """`place_new(new)`; when that fails, the new rows leave the places they took and each is placed
    alone, so that a prompt which cannot be prefilled fails its own row only (prefill computes each
    prompt apart, so a row placed alone holds what it would have held placed with the others)."""
    try:
        place_new(new)
        return
    except Exception as e:
        _vacate(live, new, retire)
        if len(new) == 1:
            return fail(new[0], e)
    for row in new:
        try:
            place_new([row])
        except Exception as e:
            _vacate(live, [row], retire)
            fail(row, e)


def _vacate(live: list[Row | None], rows: list[Row], retire: Callable[[int], None]) -> None:
    """Free the places `rows` hold in `live` (a failed placement may have taken some)."""
    for place, r in enumerate(live):
        if r is not None and any(r is row for row in rows):
            live[place] = None
            retire(place)
