"""`StaticDecoder`: decoding of a 4-bit Llama-family model with a static KV cache and a decoding step
of fixed shapes, for CUDA, where the step is captured once in a CUDA graph and replayed per token.

A decoded token on a GPU is a few hundred tiny kernels; launching them from Python costs more than
running them. Here every tensor the step touches is allocated once (the KV cache for `batch` rows of
`capacity` positions, the rotary table, the inputs), the cache is written in place at each row's slot
held in a tensor, and the step has no data-dependent shapes, so it can be:

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
(Mistral, Qwen2) attend to their window only.

`run` batches continuously with `serve.decoder.Decoder.run`'s contract, so the serving engine decodes
through either: on CUDA this one (the mode from `nf4tune.dispatch.path("decode", ...)`), on CPU the
native `Decoder`; `StaticDecoder.unsupported(model)` says why a model cannot use it. The cache grows
(a copy; the CUDA graph is captured again) when a request needs more positions than it has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..layers.linear4bit import Linear4bit
from .decoder import FAMILIES, PROJECTIONS, STATIC_ROPE, Row, _projection, _window, continuous_batching
from .sampling import Sampling, next_token

log = logging.getLogger(__name__)

MODES = ("eager", "compiled", "graphs")
# The cache grows in steps of this many positions (a new size recompiles / recaptures the step).
CAPACITY_STEP = 256


def round_capacity(positions: int, context: int | None = None) -> int:
    """`positions` rounded up to a multiple of CAPACITY_STEP, but not past the model's `context`
    (where that still holds `positions`)."""
    rounded = -(-positions // CAPACITY_STEP) * CAPACITY_STEP
    return max(positions, min(rounded, context)) if context else rounded


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 rows x RMS-normalized times the float32 weight, in bfloat16 (as the CPU decoder's)."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.bfloat16)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of t (N, heads, D) at each row's angles (N, D), in float32."""
    half = t.shape[-1] // 2
    t = t.float()
    return t * cos[:, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, None]


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
        config, inner = model.config, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.context: int | None = getattr(config, "max_position_embeddings", None)
        self.batch = batch
        self.layers = []
        for index, layer in enumerate(inner.layers):
            self.layers.append(dict(
                norm1=layer.input_layernorm.weight.detach().float(), eps1=layer.input_layernorm.variance_epsilon,
                norm2=layer.post_attention_layernorm.weight.detach().float(),
                eps2=layer.post_attention_layernorm.variance_epsilon, scale=float(layer.self_attn.scaling),
                window=_window(config, index), proj={name: _projection(layer, name) for name in PROJECTIONS}))
        self.windows = sorted({layer["window"] for layer in self.layers}, key=lambda w: (w is not None, w or 0))
        self.final_norm, self.final_eps = inner.norm.weight.detach().float(), inner.norm.variance_epsilon
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
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in FAMILIES:
            return f"it decodes {', '.join(FAMILIES)} models"
        if getattr(config, "hidden_act", None) != "silu":
            return f"it needs SiLU MLPs, not {getattr(config, 'hidden_act', None)}"
        devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        if len(devices) != 1:
            return "the model is spread over several devices"
        if getattr(model.model.rotary_emb, "rope_type", "default") not in STATIC_ROPE:
            return f"its rotary embedding ({model.model.rotary_emb.rope_type}) depends on the sequence length"
        for layer in model.model.layers:
            for name in PROJECTIONS:
                module = _projection(layer, name)
                if not isinstance(module, Linear4bit):
                    return f"its {name} layers are not 4-bit"
                if module.compute_dtype != torch.bfloat16:
                    return "it computes in bfloat16 (the model computes in another dtype)"
        return None

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions per row: a larger cache with the current one's keys and
        values copied to its start, a longer rotary table; the CUDA graph is captured again."""
        if capacity <= self.capacity:
            return
        shape = (len(self.layers), self.batch, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        values = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        if self.keys is not None:
            keys[..., :self.capacity, :] = self.keys
            values[..., :self.capacity, :] = self.values
        self.keys, self.values = keys, values
        cos, sin = self.model.model.rotary_emb(torch.zeros(1, device=self.device),
                                               torch.arange(capacity, device=self.device)[None])
        self.cos, self.sin = cos[0].float(), sin[0].float()
        self.capacity = capacity
        self._graph = self._graph_out = None

    # --- the step -----------------------------------------------------------------------------

    def _linear(self, module: Linear4bit, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, in) bf16 through the 4-bit layer, bias and unmerged adapter added in float32: the fused
        few-token kernel, or (`weight`, the layer's weight dequantized for a prefill) one GEMM."""
        if weight is None and isinstance(module.frozen_weight(), torch.Tensor):  # an unquantized (16-bit) base
            weight = module.frozen_weight()
        if weight is None:
            y = dispatch.decode_matmul_4bit(x, module.weight_packed, module.weight_absmax,
                                            module.weight_nested_absmax, module._quant_meta).float()
        else:
            y = (x @ weight.t()).float()
        if module.bias is not None:
            y = y + module.bias.float()
        if module.lora_A is not None:
            y = y + (x.float() @ module.lora_A.float().t()) @ module.lora_B.float().t() * module.scaling
        return y

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(x, self.final_norm, self.final_eps)
        head = self.model.get_output_embeddings()  # its weight alone: the CPU head's native kernel is not traced
        return F.linear(h, head.weight, head.bias).float()

    def _eager_step(self, tokens, positions, starts, slots) -> torch.Tensor:
        """Each row's next token in, its logits (B, vocab) float32 out; its keys and values written at
        its slot, attending from its first slot (`starts`) to that one."""
        batch = tokens.shape[0]
        x = self.model.get_input_embeddings()(tokens).float()
        cos, sin = self.cos[positions], self.sin[positions]
        index = torch.arange(self.capacity, device=tokens.device)[None]
        slot = slots[:, None]
        # a row attends from its first slot to this one (a padding row at least to itself: no empty softmax)
        visible = ((index >= starts[:, None]) & (index <= slot)) | (index == slot)
        masks = {w: (visible if w is None else visible & (index > slot - w))[:, None, None, :] for w in self.windows}
        where = slots[:, None, None, None].expand(batch, self.kv_heads, 1, self.head_dim)
        for i, layer in enumerate(self.layers):
            proj = layer["proj"]
            h = _rms_norm(x, layer["norm1"], layer["eps1"])
            q = self._linear(proj["q_proj"], h).view(batch, self.heads, self.head_dim)
            k = self._linear(proj["k_proj"], h).view(batch, self.kv_heads, self.head_dim)
            v = self._linear(proj["v_proj"], h).view(batch, self.kv_heads, self.head_dim)
            q = _rotate(q, cos, sin).to(torch.bfloat16)
            k = _rotate(k, cos, sin).to(torch.bfloat16)
            self.keys[i].scatter_(2, where, k[:, :, None])
            self.values[i].scatter_(2, where, v.to(torch.bfloat16)[:, :, None])
            attended = F.scaled_dot_product_attention(q[:, :, None], self.keys[i], self.values[i],
                                                      attn_mask=masks[layer["window"]], scale=layer["scale"],
                                                      enable_gqa=self.kv_heads != self.heads)
            x = x + self._linear(proj["o_proj"], attended.reshape(batch, -1))
            h = _rms_norm(x, layer["norm2"], layer["eps2"])
            act = (F.silu(self._linear(proj["gate_proj"], h)) * self._linear(proj["up_proj"], h)).to(torch.bfloat16)
            x = x + self._linear(proj["down_proj"], act)
        return self._logits(x)

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
        at once: layer by layer, each 4-bit weight dequantized once for all the prompts and multiplied
        with each prompt apart (GEMMs; a row computed exactly as it would be alone). Its keys and
        values go to its row's slots 0..T-1; returns each prompt's last logits (P, vocab) float32."""
        lengths = [len(ids) for _, ids in prompts]
        if min(lengths) == 0:
            raise ValueError("a prompt is empty")
        if max(lengths) > self.capacity:
            raise ValueError(f"a prompt of {max(lengths)} tokens does not fit the {self.capacity} positions of the cache")
        embed = self.model.get_input_embeddings()
        states = [embed(ids.to(self.device)).float() for _, ids in prompts]  # (T, hidden) each
        for i, layer in enumerate(self.layers):
            weights = {name: module.dequantized_weight(torch.bfloat16) for name, module in layer["proj"].items()}
            states = [self._prefill_layer(i, layer, weights, row, x) for (row, _), x in zip(prompts, states)]
            del weights
        return self._logits(torch.stack([x[-1] for x in states]))

    def _prefill_layer(self, i: int, layer: dict, weights: dict, row: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i over one prompt's hidden states x (T, hidden) float32, its keys and values written
        to cache row `row`; the step's arithmetic, for T tokens."""
        tokens, proj = x.shape[0], layer["proj"]
        cos, sin = self.cos[:tokens], self.sin[:tokens]

        def linear(name: str, inputs: torch.Tensor) -> torch.Tensor:
            return self._linear(proj[name], inputs, weights[name])

        h = _rms_norm(x, layer["norm1"], layer["eps1"])
        q = _rotate(linear("q_proj", h).view(tokens, self.heads, self.head_dim), cos, sin).to(torch.bfloat16)
        k = _rotate(linear("k_proj", h).view(tokens, self.kv_heads, self.head_dim), cos, sin).to(torch.bfloat16)
        v = linear("v_proj", h).view(tokens, self.kv_heads, self.head_dim).to(torch.bfloat16)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, T, D)
        self.keys[i, row, :, :tokens] = k
        self.values[i, row, :, :tokens] = v
        window = layer["window"]
        if window is not None and tokens > window:
            offset = torch.arange(tokens, device=x.device)[:, None] - torch.arange(tokens, device=x.device)[None]
            causal = dict(attn_mask=(offset >= 0) & (offset < window))
        else:
            causal = dict(is_causal=True)
        attended = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=layer["scale"],
                                                  enable_gqa=self.kv_heads != self.heads, **causal)
        x = x + linear("o_proj", attended[0].transpose(0, 1).reshape(tokens, -1))
        h = _rms_norm(x, layer["norm2"], layer["eps2"])
        act = (F.silu(linear("gate_proj", h)) * linear("up_proj", h)).to(torch.bfloat16)
        return x + linear("down_proj", act)

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling],
                 eos_ids: set[int] = frozenset(), attention_mask: torch.Tensor | None = None,
                 prefill: bool = True) -> list[list[int]]:
        """Up to `max_new_tokens` tokens after each prompt of `input_ids` (B <= batch, T; left-padded
        where `attention_mask` has zeros), each row stopping after an end-of-sequence token.
        `prefill=False`: the prompts go through the step a token at a time instead of `prefill`."""
        rows, length = input_ids.shape
        if rows > self.batch:
            raise ValueError(f"{rows} prompts for a decoder of {self.batch} rows")
        samplings = [sampling] * rows if isinstance(sampling, Sampling) else list(sampling)
        if length + max(s.max_new_tokens for s in samplings) > self.capacity:
            raise ValueError(f"prompt and reply need more than the {self.capacity} positions of the cache")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        lengths = mask.sum(-1).cpu()
        pad = self.batch - rows  # unused rows decode token 0 at slot 0 (or, token by token, after the prompts)
        if prefill:
            logits = self.prefill([(row, ids[m.bool()]) for row, (ids, m) in enumerate(zip(input_ids, mask))])
            slots = F.pad(lengths, (0, pad))
            starts = torch.zeros(self.batch, dtype=torch.long)
        else:
            ids = F.pad(input_ids, (0, 0, 0, pad)).to(self.device)
            starts = F.pad(length - lengths, (0, pad), value=length)
            logits = None
            for t in range(length):  # the prompts, a token at a time through the same step
                logits = self.step(ids[:, t], (t - starts).clamp(min=0), starts, t)
            slots = torch.full((self.batch,), length, dtype=torch.long)
        logits = logits[:rows].cpu()
        positions = slots - starts
        generators = [None if s.seed is None else torch.Generator().manual_seed(s.seed) for s in samplings]
        seen = [i[m.bool()].tolist() for i, m in zip(input_ids, mask)]
        out: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        while True:
            step = []
            for row, s in enumerate(samplings):
                if not done[row]:
                    penalized = torch.tensor(seen[row]) if s.repetition_penalty != 1.0 else None
                    token = next_token(logits[row], s, penalized, generators[row], out[row])
                    out[row].append(token)
                    seen[row].append(token)
                    done[row] = token in eos_ids or len(out[row]) >= s.max_new_tokens
                step.append(out[row][-1])
            if all(done):
                return out
            logits = self.step(torch.tensor(step + [0] * pad), positions, starts, slots)[:rows].cpu()
            advance = torch.tensor([not d for d in done] + [False] * pad, dtype=torch.long)
            slots, positions = slots + advance, positions + advance  # a finished row stays where it is

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
        for place, r, logits in zip(places, new, self.prefill(prompts).cpu()):
            live[place], r.logits, slots[place] = r, logits, len(r.prompt_ids)
