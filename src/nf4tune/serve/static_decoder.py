"""`StaticDecoder`: decoding of a 4-bit Llama-family model with a static KV cache and a decoding step
of fixed shapes, for CUDA, where the step is captured once in a CUDA graph and replayed per token.

A decoded token on a GPU is a few hundred tiny kernels; launching them from Python costs more than
running them. Here every tensor the step touches is allocated once (the KV cache for `batch` rows of
`capacity` positions, the rotary table, the inputs), the cache is written in place at a slot held in
a tensor, and the step has no data-dependent shapes, so it can be:

- `mode="eager"`: run as written (the reference the others are held to);
- `mode="compiled"`: compiled whole by `torch.compile(fullgraph=True)` (Inductor fuses the norms,
  rotary, SwiGLU and residual adds; each 4-bit projection is the `nf4tune::matmul_4bit` custom op:
  on CUDA the Triton few-token kernel, on CPU the AVX-512 one, through `nf4tune.dispatch`);
- `mode="graphs"` (CUDA only): the compiled step captured in a `torch.cuda.CUDAGraph` and replayed.

Adapters stay unmerged (x A^T B^T added in float32). Prompts are fed through the same step a token
at a time, so the prefill needs no second code path (a GPU prefill by GEMMs is a later step). The CPU
tests run "eager" and "compiled"; the CPU's own fast decoder remains `serve.decoder.Decoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..layers.linear4bit import Linear4bit
from .decoder import PROJECTIONS, _projection
from .sampling import Sampling, next_token

MODES = ("eager", "compiled", "graphs")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 rows x RMS-normalized times the float32 weight, in bfloat16 (as the CPU decoder's)."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.bfloat16)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of t (B, heads, D) at each row's angles (B, D), in float32."""
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
        self.model, self.config, self.device, self.mode = model, model.config, device, mode
        config, inner = model.config, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.batch, self.capacity = batch, capacity
        self.layers = []
        for layer in inner.layers:
            projections = {name: _projection(layer, name) for name in PROJECTIONS}
            if not all(isinstance(m, Linear4bit) for m in projections.values()):
                raise ValueError("StaticDecoder decodes models whose projections are 4-bit")
            self.layers.append(dict(
                norm1=layer.input_layernorm.weight.detach().float(), eps1=layer.input_layernorm.variance_epsilon,
                norm2=layer.post_attention_layernorm.weight.detach().float(),
                eps2=layer.post_attention_layernorm.variance_epsilon, scale=float(layer.self_attn.scaling),
                proj=projections))
        self.final_norm, self.final_eps = inner.norm.weight.detach().float(), inner.norm.variance_epsilon
        shape = (len(self.layers), batch, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        self.values = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        cos, sin = inner.rotary_emb(torch.zeros(1, device=device), torch.arange(capacity, device=device)[None])
        self.cos, self.sin = cos[0].float(), sin[0].float()
        # the step's inputs, written in place before each call (a CUDA graph reads them from these addresses)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self._step = self._eager_step
        if mode != "eager":
            self._step = torch.compile(self._eager_step, fullgraph=True, backend=backend)
        self._graph = self._graph_out = None

    # --- the step -----------------------------------------------------------------------------

    def _linear(self, module: Linear4bit, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) bf16 through the 4-bit layer, bias and unmerged adapter added in float32."""
        y = dispatch.decode_matmul_4bit(x, module.weight_packed, module.weight_absmax, module.weight_nested_absmax,
                                        module._quant_meta).float()
        if module.bias is not None:
            y = y + module.bias.float()
        if module.lora_A is not None:
            y = y + (x.float() @ module.lora_A.float().t()) @ module.lora_B.float().t() * module.scaling
        return y

    def _eager_step(self, tokens, positions, starts, slot) -> torch.Tensor:
        """Each row's next token in, its logits (B, vocab) float32 out; keys and values written at `slot`."""
        batch = tokens.shape[0]
        x = self.model.get_input_embeddings()(tokens).float()
        cos, sin = self.cos[positions], self.sin[positions]
        slots = torch.arange(self.capacity, device=tokens.device)
        # a row attends from its first slot to this one (a padding step at least to itself: no empty softmax)
        visible = ((slots[None] >= starts[:, None]) & (slots[None] <= slot)) | (slots[None] == slot)
        mask = visible[:, None, None, :]
        for i, layer in enumerate(self.layers):
            proj = layer["proj"]
            h = _rms_norm(x, layer["norm1"], layer["eps1"])
            q = self._linear(proj["q_proj"], h).view(batch, self.heads, self.head_dim)
            k = self._linear(proj["k_proj"], h).view(batch, self.kv_heads, self.head_dim)
            v = self._linear(proj["v_proj"], h).view(batch, self.kv_heads, self.head_dim)
            q = _rotate(q, cos, sin).to(torch.bfloat16)
            k = _rotate(k, cos, sin).to(torch.bfloat16)
            self.keys[i].index_copy_(2, slot, k[:, :, None])
            self.values[i].index_copy_(2, slot, v.to(torch.bfloat16)[:, :, None])
            attended = F.scaled_dot_product_attention(q[:, :, None], self.keys[i], self.values[i], attn_mask=mask,
                                                      scale=layer["scale"], enable_gqa=self.kv_heads != self.heads)
            x = x + self._linear(proj["o_proj"], attended.reshape(batch, -1))
            h = _rms_norm(x, layer["norm2"], layer["eps2"])
            act = (F.silu(self._linear(proj["gate_proj"], h)) * self._linear(proj["up_proj"], h)).to(torch.bfloat16)
            x = x + self._linear(proj["down_proj"], act)
        h = _rms_norm(x, self.final_norm, self.final_eps)
        head = self.model.get_output_embeddings()  # its weight alone: the CPU head's native kernel is not traced
        return F.linear(h, head.weight, head.bias).float()

    def _capture(self) -> None:
        """Capture the step in a CUDA graph after warm-up runs on a side stream (compiling, autotuning
        and the kernels' first-use checks happen there, not in the capture)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        keys, values = self.keys.clone(), self.values.clone()  # the warm-up writes the cache: put it back
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(self.tokens, self.positions, self.starts, self.slot)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.keys.copy_(keys)
        self.values.copy_(values)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._graph_out = self._step(self.tokens, self.positions, self.starts, self.slot)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed each row (B = `batch`) its token at rotary position `positions`, attending to cache slots
        `starts`..`slot`; returns the logits (B, vocab) float32."""
        if slot >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.starts.copy_(starts)
        self.slot.fill_(slot)
        if self.mode != "graphs":
            return self._step(self.tokens, self.positions, self.starts, self.slot)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._graph_out.clone()

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling],
                 eos_ids: set[int] = frozenset(), attention_mask: torch.Tensor | None = None) -> list[list[int]]:
        """Up to `max_new_tokens` tokens after each prompt of `input_ids` (B <= batch, T; left-padded
        where `attention_mask` has zeros), each row stopping after an end-of-sequence token."""
        rows, length = input_ids.shape
        if rows > self.batch:
            raise ValueError(f"{rows} prompts for a decoder of {self.batch} rows")
        samplings = [sampling] * rows if isinstance(sampling, Sampling) else list(sampling)
        if length + max(s.max_new_tokens for s in samplings) > self.capacity:
            raise ValueError(f"prompt and reply need more than the {self.capacity} positions of the cache")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pad = self.batch - rows  # unused rows decode token 0 at position 0, each attending to itself
        ids = F.pad(input_ids, (0, 0, 0, pad)).to(self.device)
        starts = F.pad(length - mask.sum(-1), (0, pad), value=length).to(self.device)
        generators = [None if s.seed is None else torch.Generator().manual_seed(s.seed) for s in samplings]
        seen = [i[m.bool()].tolist() for i, m in zip(input_ids, mask)]
        logits = None
        for t in range(length):  # the prompts, a token at a time through the same step
            logits = self.step(ids[:, t], (t - starts).clamp(min=0), starts, t)
        out: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        slot = length
        while True:
            step = []
            for row, s in enumerate(samplings):
                if not done[row]:
                    penalized = torch.tensor(seen[row]) if s.repetition_penalty != 1.0 else None
                    token = next_token(logits[row].cpu(), s, penalized, generators[row], out[row])
                    out[row].append(token)
                    seen[row].append(token)
                    done[row] = token in eos_ids or len(out[row]) >= s.max_new_tokens
                step.append(out[row][-1])
            if all(done):
                return out
            tokens = torch.tensor(step + [0] * pad, device=self.device)
            logits = self.step(tokens, (slot - starts).clamp(min=0), starts, slot)
            slot += 1
