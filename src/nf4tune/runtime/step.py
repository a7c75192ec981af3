"""One functional model step for the decoder families: `ModelStep.block(x, layer, positions, cache, linear)`,
written once (gpt-fast's shape), with what differs between families declared in `registry.FamilySpec`.

A step takes N tokens' residual stream x (N, hidden) in float32 and runs one decoder layer over it:
RMSNorm, the q/k/v projections (or Phi-3's fused qkv), per-head q/k norms (Qwen3, Gemma 3), rotary
(full, partial, per-layer bases or none), attention through `cache`, the output projection, Gemma's
sandwich norms, the gated MLP (SiLU or tanh-GELU, fused gate/up for Phi-3), Granite's residual
multiplier. Projections go through `linear(module, x)` (the caller's choice: the fused few-token 4-bit
kernel, a weight dequantized once for a prefill, the compile-friendly custom op), norms and the head
through `nf4tune.dispatch`. Only the cache differs between its users:

- `serve.decoder.Decoder` (CPU): a right-aligned cache attended by the AVX-512 `decode_attention` kernel;
- `serve.static_decoder.StaticDecoder` (CUDA graphs / torch.compile): a static cache written in place;
- `evaluate.packed.PackedScorer`: many prompts packed into one pass, prefixes shared.

A cache is any object with `attend(layer, q, k, v, rope) -> (N, heads * head_dim)` bfloat16: q (N, heads *
D), k and v (N, kv_heads * D) bfloat16, `rope` the (cos, sin) (N, D) float32 rotary angles it applies to q and k
(None where the block rotated them itself or the layer has no rotary). `rotate` and `attention` below
are the reference arithmetic caches share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dispatch
from ..layers.linear4bit import Linear4bit
from ..registry import FAMILIES, FamilySpec, families

# rope types whose angles do not depend on the sequence length (not "dynamic", "longrope")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
Linear = Callable[[Linear4bit, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, native: bool = True) -> torch.Tensor:
    """float32 rows x (M, K) RMS-normalized times the float32 weight, in bfloat16: `dispatch.rms_norm`, or
    (not `native`, or while torch.compile traces: Inductor fuses it) its PyTorch arithmetic."""
    if native and not torch.compiler.is_compiling():
        return dispatch.rms_norm(x, weight, eps)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.bfloat16)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of t (N, heads, D) at each row's angles (N, R), R <= D (the first R dims rotate:
    partial rotary), in float32, returned in bfloat16."""
    rot = cos.shape[-1]
    t = t.float()
    r, rest = t[..., :rot], t[..., rot:]
    half = rot // 2
    r = r * cos[:, None] + torch.cat((-r[..., half:], r[..., :half]), -1) * sin[:, None]
    return (torch.cat((r, rest), -1) if rest.shape[-1] else r).to(torch.bfloat16)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys (positions k_pos (S,)) each query (q_pos (T,)) attends to: earlier or itself, and within
    `window` positions (itself included) where the layer slides."""
    offset = q_pos[:, None] - k_pos[None]
    mask = offset >= 0
    return mask & (offset < window) if window is not None else mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              softcap: float | None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, KV, S, D) bfloat16; `mask` True where a query attends (broadcast to (B, H,
    T, S); None: causal with T == S). Gemma 2's soft-capping (cap * tanh(scores / cap)) is computed out;
    otherwise SDPA."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device), None)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(torch.bfloat16)


def _norm(module, offset: float) -> tuple[torch.Tensor, float]:
    """An RMSNorm module as (float32 weight, eps): Gemma's scale by (offset + w)."""
    eps = getattr(module, "variance_epsilon", None)
    return module.weight.detach().float().add(offset).contiguous(), float(eps if eps is not None else module.eps)


def _window(config, spec: FamilySpec, index: int) -> int | None:
    """How many past positions (itself included) layer `index` attends to; None: all."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None) if spec.sliding_window else None


@dataclass(eq=False)
class Layer:
    """One decoder layer's parts as the step uses them."""

    index: int
    proj: dict[str, Linear4bit]  # transformers' names: q_proj.. or qkv_proj, gate_up_proj
    norms: dict[str, tuple[torch.Tensor, float]]  # input, post_attention, (pre_feedforward, post_feedforward), q, k
    act: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    window: int | None
    softcap: float | None
    rope_key: str | None  # the rotary table it reads (Gemma 3's local / global bases); None: no rotary


class ModelStep:
    """A decoder-only transformers model's weights and family rules, for `block`.

        step = ModelStep(model)
        x = step.embed(ids)
        for layer in step.layers:
            step.block(x, layer, positions, cache, linear)
        logits = step.logits(step.final(x))
    """

    def __init__(self, model):
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"nf4tune's decoding step cannot run this model: {reason}.")
        config, inner = model.config, model.model
        self.model, self.config = model, config
        self.spec = spec = FAMILIES[config.model_type]
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.embed_multiplier = float(getattr(config, spec.embedding_multiplier)) if spec.embedding_multiplier else 1.0
        self.residual_multiplier = float(getattr(config, spec.residual_multiplier)) if spec.residual_multiplier else 1.0
        divisor = getattr(config, spec.logits_divisor, None) if spec.logits_divisor else None
        self.logits_divisor = float(divisor) if divisor else None
        cap = getattr(config, spec.logits_softcap, None) if spec.logits_softcap else None
        self.logits_softcap = float(cap) if cap else None
        attention_cap = getattr(config, spec.attention_softcap, None) if spec.attention_softcap else None
        rope_flags = getattr(config, spec.rope_layers) if spec.rope_layers else None
        types = getattr(config, "layer_types", None)
        self.rotary = inner.rotary_emb
        self.rope_type = getattr(self.rotary, "rope_type", "default")
        if isinstance(self.rope_type, dict):  # Gemma 3: one per layer type
            self.rope_type = next(iter(set(self.rope_type.values()) - set(STATIC_ROPE)), "default")
        self.layers = []
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            proj = {name: getattr(attn, name, None) or getattr(mlp, name) for name in self.projection_names(spec)}
            norms = {"input": _norm(layer.input_layernorm, spec.norm_offset),
                     "post_attention": _norm(layer.post_attention_layernorm, spec.norm_offset)}
            if spec.sandwich_norms:
                norms["pre_feedforward"] = _norm(layer.pre_feedforward_layernorm, spec.norm_offset)
                norms["post_feedforward"] = _norm(layer.post_feedforward_layernorm, spec.norm_offset)
            if spec.qk_norm:
                norms["q"], norms["k"] = _norm(attn.q_norm, spec.norm_offset), _norm(attn.k_norm, spec.norm_offset)
            rope_key = types[i] if spec.rope_per_layer_type else ""
            if rope_flags is not None and not rope_flags[i]:
                rope_key = None
            act = getattr(mlp, "act_fn", None) or mlp.activation_fn
            self.layers.append(Layer(i, proj, norms, act, float(attn.scaling), _window(config, spec, i),
                                     float(attention_cap) if attention_cap else None, rope_key))
        self.final_norm = _norm(inner.norm, spec.norm_offset)
        self.native = True  # norms and head through dispatch's kernels (False: PyTorch's arithmetic throughout)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def projection_names(spec: FamilySpec) -> tuple[str, ...]:
        if spec.fused_projections:
            return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @classmethod
    def unsupported(cls, model) -> str | None:
        """Why the step cannot run `model` (its family, or layers that are not bfloat16 4-bit ones), or None."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in families("decoder"):
            return f"it decodes {', '.join(families('decoder'))} models, not {model_type}"
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if head_dim % 16 or head_dim > 512 or config.hidden_size % 16:
            return "its head size and hidden size must be multiples of 16 (head size at most 512)"
        for layer in model.model.layers:
            for name in cls.projection_names(FAMILIES[model_type]):
                module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name, None)
                if not isinstance(module, Linear4bit):
                    return f"its {name} layers are not 4-bit"
                if module.compute_dtype != torch.bfloat16:
                    return "it computes in bfloat16 (the model computes in another dtype)"
        return None

    # --- rotary ---------------------------------------------------------------------------------

    @property
    def static_rope(self) -> bool:
        """Whether the rotary angles depend on the position only (so a table of them holds)."""
        return self.rope_type in STATIC_ROPE

    def _angles(self, positions: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.final_norm[0].device
        args = (key,) if key else ()
        cos, sin = self.rotary(torch.zeros(1, device=device), positions.to(device)[None], *args)
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def reserve_rope(self, positions: int) -> None:
        """Tables of rotary angles for positions 0..positions-1 (where they depend on the position only)."""
        if not self.static_rope:
            return
        for key in {layer.rope_key for layer in self.layers} - {None}:
            table = self._tables.get(key)
            if table is None or table[0].shape[0] < positions:
                self._tables[key] = self._angles(torch.arange(positions), key)

    def rope(self, positions: torch.Tensor, key: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin (N, R) float32 for `positions` (N,) under rotary table `key` (None: no rotary)."""
        if key is None:
            return None
        table = self._tables.get(key)
        if table is not None and (torch.compiler.is_compiling() or table[0].shape[0] > int(positions.max())):
            return table[0][positions], table[1][positions]
        return self._angles(positions, key)

    def ropes(self, positions: torch.Tensor) -> dict:
        """Every rotary table's angles at `positions`, computed once per step for all layers."""
        return {key: self.rope(positions, key) for key in {layer.rope_key for layer in self.layers}}

    # --- the model ------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream (N, hidden) float32 for token ids (N,)."""
        x = self.model.get_input_embeddings()(ids).float()
        return x * self.embed_multiplier if self.embed_multiplier != 1.0 else x

    def norm(self, x: torch.Tensor, weight_eps: tuple[torch.Tensor, float]) -> torch.Tensor:
        return rms_norm(x, *weight_eps, native=self.native)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of the residual stream x (N, hidden), bf16."""
        return self.norm(x, self.final_norm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's float32 logits for bf16 normalized states h (N, hidden), Granite's divisor and
        Gemma 2's soft cap applied."""
        head = self.model.get_output_embeddings()
        native = self.native and not torch.compiler.is_compiling()
        logits = (head(h) if native else F.linear(h, head.weight, head.bias)).float()
        if self.logits_divisor:
            logits = logits / self.logits_divisor
        if self.logits_softcap:
            logits = torch.tanh(logits / self.logits_softcap) * self.logits_softcap
        return logits

    def block(self, x: torch.Tensor, layer: Layer, ropes: dict, cache, linear: Linear) -> torch.Tensor:
        """Layer `layer` over x (N, hidden) float32, updated in place and returned; `ropes` from `ropes()`."""
        n, d = x.shape[0], self.head_dim
        norms, proj = layer.norms, layer.proj
        h = self.norm(x, norms["input"])
        if "qkv_proj" in proj:
            q, k, v = linear(proj["qkv_proj"], h).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        else:
            q, k, v = (linear(proj[name], h) for name in ("q_proj", "k_proj", "v_proj"))
        if "q" in norms:
            q = self.norm(q.reshape(-1, d).float(), norms["q"]).view(n, -1)
            k = self.norm(k.reshape(-1, d).float(), norms["k"]).view(n, -1)
        rope = ropes[layer.rope_key]
        if rope is not None and rope[0].shape[-1] != d:  # partial rotary: rotated here, the cache sees none
            q = rotate(q.reshape(n, -1, d), *rope).view(n, -1)
            k = rotate(k.reshape(n, -1, d), *rope).view(n, -1)
            rope = None
        attended = cache.attend(layer, q.contiguous(), k.contiguous(), v.contiguous(), rope)
        y = linear(proj["o_proj"], attended)
        if "post_feedforward" in norms:  # Gemma 2 / 3: normalized before joining the residual stream
            y = self.norm(y.float(), norms["post_attention"])
        x += y.float() * self.residual_multiplier if self.residual_multiplier != 1.0 else y.float()
        h = self.norm(x, norms["pre_feedforward" if "pre_feedforward" in norms else "post_attention"])
        if "gate_up_proj" in proj:
            gate, up = linear(proj["gate_up_proj"], h).chunk(2, -1)
        else:
            gate, up = linear(proj["gate_proj"], h), linear(proj["up_proj"], h)
        y = linear(proj["down_proj"], layer.act(gate) * up)
        if "post_feedforward" in norms:
            y = self.norm(y.float(), norms["post_feedforward"])
        x += y.float() * self.residual_multiplier if self.residual_multiplier != 1.0 else y.float()
        return x


def dequantized(layer: Layer, buffers: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Each of the layer's 4-bit weights dequantized once for all of a prefill's prompts, in the dtype
    `dispatch.training_matmul_dtype` gives the frozen products of bfloat16 activations: float32 on a CPU
    whose float32 GEMM is the faster (1.4x at a 32-token prompt without AMX), as the 4-bit layers' own
    many-token forward computes them. With `buffers` ({projection name: tensor}, filled on first use), each
    weight is written into the buffer the same projection of the layer before used: fresh weight-sized
    tensors per layer cost a third of a prefill on CPU, the kernel's page faults on new memory."""
    modules = list(layer.proj.values())
    probe = torch.empty(0, dtype=torch.bfloat16, device=modules[0].storage_device)
    dtype = dispatch.training_matmul_dtype(probe)
    if buffers is None:
        return {id(m): m.dequantized_weight(dtype) for m in modules}
    weights = {}
    for name, m in layer.proj.items():
        buffer = buffers.get(name)
        if buffer is None or buffer.numel() < m.in_features * m.out_features:
            buffer = buffers[name] = torch.empty(m.in_features * m.out_features, dtype=dtype, device=probe.device)
        weights[id(m)] = m.dequantized_weight(dtype, out=buffer)
    return weights


def gemm(weights: dict[int, torch.Tensor], adapters=None, row: int | None = None) -> Linear:
    """`linear` for a prefill: each projection one GEMM with its dequantized weight, bias and unmerged
    adapter added by `Linear4bit.infer` (or, with `adapters` (`AdapterBank.rows`), prompt `row`'s own)."""
    def linear(module: Linear4bit, x: torch.Tensor) -> torch.Tensor:
        w = weights[id(module)]

        def product(t: torch.Tensor) -> torch.Tensor:  # in t's dtype, computed in w's
            return dispatch.matmul_in(t, w.t(), w.dtype)

        if adapters is not None:
            return adapters.infer(module, x, product, rows=[row])
        return module.infer(x, product)
    return linear


class PromptCache:
    """A cache for one prompt's prefill: its T tokens' keys and values written to row `row` of
    `keys` / `values` (layers, rows, kv_heads, capacity, D) at slots end-T..end-1, attending causally
    within the prompt (each prompt apart: a row is computed as it would be alone)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, row: int, end: int):
        self.keys, self.values, self.row, self.end = keys, values, row, end

    def attend(self, layer: Layer, q, k, v, rope) -> torch.Tensor:
        n, d = q.shape[0], self.keys.shape[-1]
        q, k, v = q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, T, D)
        self.keys[layer.index, self.row, :, self.end - n:self.end] = k
        self.values[layer.index, self.row, :, self.end - n:self.end] = v
        mask = None
        if (layer.window is not None and n > layer.window) or layer.softcap is not None:
            pos = torch.arange(n, device=q.device)
            mask = causal_mask(pos, pos, layer.window)
        out = attention(q[None], k[None], v[None], mask, layer.scale, layer.softcap)
        return out[0].transpose(0, 1).reshape(n, -1)


def prefill(step: ModelStep, prompts: list[tuple[int, torch.Tensor]], keys: torch.Tensor, values: torch.Tensor,
            end: Callable[[int], int], adapters=None) -> torch.Tensor:
    """Run each prompt (cache row, ids (T,)) through the model layer by layer, each 4-bit weight dequantized
    once for all of them and multiplied with each prompt apart (GEMMs; a row computed exactly as alone),
    its keys and values written to its row ending before slot `end(T)`; returns their last logits (P, vocab)."""
    device = keys.device
    states = [step.embed(ids.to(device)) for _, ids in prompts]
    ropes = [step.ropes(torch.arange(len(ids), device=device)) for _, ids in prompts]
    buffers: dict[str, torch.Tensor] = {}  # reused layer after layer
    for layer in step.layers:
        weights = dequantized(layer, buffers)
        for (row, ids), x, rope in zip(prompts, states, ropes):
            cache = PromptCache(keys, values, row, end(len(ids)))
            step.block(x, layer, rope, cache, gemm(weights, adapters, row))
        del weights
    return step.logits(step.final(torch.stack([x[-1] for x in states])))
