"""Mixture-of-experts weights in 4-bit: `ExpertWeight4bit` and the experts forward that reads them.

transformers 5 keeps a MoE layer's experts as one module holding fused 3-D parameters (`gate_up_proj`
of shape (experts, 2 * intermediate, hidden), `down_proj` (experts, hidden, intermediate); gpt-oss stores
them transposed, (experts, in, out)). Each such parameter is replaced by an `ExpertWeight4bit` of the
same name: the whole parameter quantized as bitsandbytes' `quantize_4bit` quantizes it (flattened
row-major), so expert e's weights are one contiguous run of blocks, which is all the forward dequantizes
when tokens are routed to e. An adapter is per expert, in PEFT's `target_parameters` layout
(`ParamWrapper`): lora_A (r * experts, in), lora_B (out, r * experts), expert e's pair being
A.view(experts, r, in)[e] and B.view(out, r, experts)[:, :, e].

The experts module keeps its transformers class; its forward is chosen through transformers' experts
implementation registry (`ExpertsInterface`), under the name `EXPERTS_IMPLEMENTATION`: `experts_forward`,
a grouped pass (the layer's (token, expert) pairs sorted by expert once; per projection one custom autograd
function that decodes each routed expert once, in the dtype `dispatch.training_matmul_dtype` picks, and
computes its base and adapter products together, saving only its input for backward). The per-expert loop
it replaced stays as `experts_forward_reference` (`REFERENCE_IMPLEMENTATION`), the plain-PyTorch reference
the grouped pass is tested against (tests/test_moe_grouped.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import dispatch
from ..errors import Nf4tuneError
from ..quant import QuantizedTensor
from ..quant.codes import dynamic_code, on_device
from ..quant.tensor import QuantLayout
from . import kept_outputs
from .linear4bit import lora_scaling

EXPERTS_IMPLEMENTATION = "nf4tune"
# The plain-PyTorch loop `experts_forward` is tested against (`model.set_experts_implementation(...)` selects it).
REFERENCE_IMPLEMENTATION = "nf4tune_reference"
# The fused 3-D parameters of transformers' experts modules, input projection first (the order the forward
# applies them, and the order of the module's parameters).
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


class ExpertWeight4bit(nn.Module):
    """One fused (experts, a, b) expert parameter, frozen in 4-bit (or, unquantized, in the compute dtype),
    with an optional per-expert LoRA adapter.

    Args:
        shape: the parameter's shape as transformers holds it.
        transposed: the experts module stores (experts, in, out) (transformers' `is_transposed`), not
            (experts, out, in).
        compute_dtype: the dtype of the products.
    """

    STORAGE = ("packed", "absmax", "nested_absmax", "dense")

    def __init__(self, shape, transposed: bool, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.shape = torch.Size(shape)
        self.num_experts = self.shape[0]
        self.transposed = transposed
        self.in_features, self.out_features = (
            (self.shape[1], self.shape[2]) if transposed else (self.shape[2], self.shape[1]))
        self.compute_dtype = compute_dtype
        for name in self.STORAGE:
            self.register_buffer(name, None)
        self.layout: QuantLayout | None = None  # of the 4-bit parameter (None: unquantized or not yet loaded)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.r, self.scaling = 0, 0.0

    def set_weight(self, weight: QuantizedTensor | torch.Tensor) -> None:
        """Hold `weight`: the 4-bit parameter, or (an unquantized base) the tensor itself, copied in the
        compute dtype."""
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"a {list(weight.shape)} weight does not fit a {list(self.shape)} expert parameter")
        if isinstance(weight, torch.Tensor):
            self.dense = weight.to(self.compute_dtype, copy=True)
            return
        self.packed, self.absmax, self.nested_absmax = weight.packed, weight.absmax, weight.nested_absmax
        self.layout = weight.layout

    @property
    def is_quantized(self) -> bool:
        return self.packed is not None

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The whole parameter as a `QuantizedTensor` (a view of this module's buffers)."""
        return QuantizedTensor(self.packed, self.absmax, self.layout, self.nested_absmax)

    @property
    def storage_device(self) -> torch.device | None:
        held = self.packed if self.packed is not None else self.dense
        return held.device if held is not None else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole parameter in `dtype`, as transformers holds it (for merging and saving)."""
        if not self.is_quantized:
            return self.dense.to(dtype)
        return self.quantized_weight.dequantize(dtype)

    def _expert_quantized(self, e: int) -> tuple[QuantizedTensor, int]:
        """Expert e's run of blocks as a `QuantizedTensor` with float32 absmax, and the offset of e's first
        element in it (0 when e's elements fill whole blocks, as in every real model)."""
        layout = self.layout
        per_expert = self.shape[1] * self.shape[2]
        bs, total = layout.blocksize, math.prod(self.shape)
        first, last = e * per_expert, (e + 1) * per_expert
        k0, k1 = first // bs, -(-last // bs)
        stop = min(k1 * bs, total)
        absmax = self.absmax[k0:k1]
        if self.nested_absmax is not None:  # undo double quantization for these blocks only
            nested = self.nested_absmax[torch.arange(k0, k1, device=absmax.device) // layout.nested_blocksize]
            absmax = on_device(absmax.device, dynamic_code)[absmax.long()] * nested + layout.offset
        packed = self.packed.view(-1)[k0 * bs // 2: -(-stop // 2)]
        q = QuantizedTensor(packed, absmax, QuantLayout(torch.Size([stop - k0 * bs]), layout.dtype, layout.quant_type, bs))
        return q, first - k0 * bs

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight as stored, (a, b), in `dtype`: dequantized into a reused buffer (valid until this
        thread's next dequantization: use it at once), or the unquantized tensor's slice."""
        if not self.is_quantized:
            return self.dense[e].to(dtype)
        q, start = self._expert_quantized(e)
        if start == 0 and q.numel == self.shape[1] * self.shape[2]:  # whole blocks: decoded into the reused buffer
            whole = QuantLayout(self.shape[1:], q.dtype, q.quant_type, q.blocksize)
            return dispatch.dequantize_scratch(QuantizedTensor(q.packed, q.absmax, whole), dtype)
        return q.dequantize(dtype)[start:start + self.shape[1] * self.shape[2]].view(self.shape[1:])

    def expert_decoder(self, dtype: torch.dtype):
        """A function e -> `expert(e, dtype)` for decoding many experts in one pass: the whole parameter's float32
        absmax is computed once (undoing double quantization for all blocks in one operation) instead of once
        per expert, and each expert is decoded from its slice into the reused buffer (valid until this
        thread's next dequantization)."""
        per_expert = self.shape[1] * self.shape[2]
        if not self.is_quantized or per_expert % self.layout.blocksize:
            return lambda e: self.expert(e, dtype)
        absmax = self.quantized_weight.float_absmax()
        packed, blocks, shape = self.packed.view(-1), per_expert // self.layout.blocksize, self.shape[1:]
        decoder = dispatch.scratch_decoder(packed[:per_expert // 2], absmax[:blocks], self.layout.quant_type,
                                           self.layout.blocksize, dtype)
        return lambda e: decoder(packed[e * per_expert // 2:(e + 1) * per_expert // 2],
                                 absmax[e * blocks:(e + 1) * blocks], shape)

    def add_lora(self, r: int, alpha: float, use_rslora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        """A per-expert adapter in PEFT's ParamWrapper layout: A Kaiming-uniform, B zero (as PEFT)."""
        device = self.storage_device
        self.r, self.scaling = r, lora_scaling(alpha, r, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r * self.num_experts, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r * self.num_experts, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def remove_lora(self) -> None:
        self.lora_A = self.lora_B = None
        self.r, self.scaling = 0, 0.0

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W_e^T (+ expert e's adapter term), x of shape (tokens, in)."""
        # Inside a gradient-checkpointed region that keeps outputs (layers/kept_outputs.py, in call order: the
        # recompute routes the same tokens to the same experts), the recompute reuses the first run's product.
        region = kept_outputs.current()
        kept = region.take(self) if region is not None else None
        y = _FrozenExpertMatmul.apply(x, self, e, kept)
        if region is not None and kept is None:
            region.keep(self, y)
        if self.lora_A is not None:
            a = self.lora_A.view(self.num_experts, self.r, self.in_features)[e].to(x.dtype)
            b = self.lora_B.view(self.out_features, self.r, self.num_experts)[:, :, e].to(x.dtype)
            y = y + (x @ a.t()) @ (b * self.scaling).t()
        return y

    def extra_repr(self) -> str:
        storage = self.layout.quant_type if self.layout is not None else "16-bit"
        storage = storage if self.storage_device is not None else "empty"
        return f"{list(self.shape)}, {storage}, transposed={self.transposed}, r={self.r}"


class _FrozenExpertMatmul(torch.autograd.Function):
    """x @ W_e^T with W_e dequantized in forward and again in backward: no copy of it outlives a call."""

    @staticmethod
    def forward(ctx, x, weight: ExpertWeight4bit, e: int, kept: torch.Tensor | None = None):
        ctx.weight, ctx.e = weight, e
        if kept is not None:  # the first run's output, handed back in a checkpointed recompute
            return kept
        w = weight.expert(e, x.dtype)
        return x @ w if weight.transposed else x @ w.t()

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight.expert(ctx.e, grad_y.dtype)
            grad_x = grad_y @ w.t() if ctx.weight.transposed else grad_y @ w
        return grad_x, None, None, None


# Rows of one expert's tokens multiplied at a time by the grouped pass: its float32 copies of a block of inputs and
# of the block's product stay a few MiB whatever the number of tokens (`gemm.ROWS`).
GROUP_ROWS = 1024


def _grouped_lora(weight: ExpertWeight4bit, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adapter as (experts, r, in) A and (experts, out, r) B pre-scaled, in `dtype` (contiguous: each expert's
    pair is read as plain matrices), or None."""
    if weight.lora_A is None:
        return None
    a = weight.lora_A.detach().view(weight.num_experts, weight.r, weight.in_features).to(dtype)
    b = weight.lora_B.detach().view(weight.out_features, weight.r, weight.num_experts).permute(2, 0, 1)
    return a, (b.to(dtype) * weight.scaling).contiguous()


class _GroupedExperts(torch.autograd.Function):
    """y = x W_e^T + s (x A_e^T) B_e^T for each expert e's run of rows of `x` (its tokens, sorted by expert):
    each routed expert decoded once, in the dtype `dispatch.training_matmul_dtype` picks (float32 for
    bfloat16 on a CPU whose float32 GEMM is the faster), its base and adapter products computed from one
    converted block of rows and rounded once. Saves only `x` (and the routing, as counts); backward
    decodes each expert again and forms dx, dA and dB in one pass per expert."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weight: ExpertWeight4bit, counts: list[int], kept):
        ctx.weight, ctx.counts = weight, counts
        ctx.save_for_backward(x)
        if kept is not None:  # the first run's output (adapter included: same step, same parameters)
            return kept
        dtype = dispatch.training_matmul_dtype(x)
        lora = _grouped_lora(weight, dtype)
        out = x.new_empty((x.shape[0], weight.out_features))
        decode, start = weight.expert_decoder(dtype), 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            w = decode(e)
            wt = w if weight.transposed else w.t()
            for s in range(start, start + n, GROUP_ROWS):
                stop = min(s + GROUP_ROWS, start + n)
                xb = x[s:stop].to(dtype)
                yb = xb @ wt
                if lora is not None:
                    yb.addmm_(xb @ lora[0][e].t(), lora[1][e].t())
                out[s:stop] = yb
            start += n
        return out

    @staticmethod
    def backward(ctx, grad_y):
        (x,), weight, counts = ctx.saved_tensors, ctx.weight, ctx.counts
        want_x, want_a, want_b = ctx.needs_input_grad[:3]
        dtype = dispatch.training_matmul_dtype(grad_y)
        lora = _grouped_lora(weight, dtype) if weight.lora_A is not None else None
        grad_x = x.new_empty(x.shape) if want_x else None
        grad_a = x.new_zeros((weight.num_experts, weight.r, weight.in_features), dtype=dtype) if want_a else None
        grad_b = x.new_zeros((weight.num_experts, weight.out_features, weight.r), dtype=dtype) if want_b else None
        decode, start = weight.expert_decoder(dtype), 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            w = decode(e) if want_x else None
            for s in range(start, start + n, GROUP_ROWS):
                stop = min(s + GROUP_ROWS, start + n)
                g = grad_y[s:stop].to(dtype)
                gb = g @ lora[1][e] if lora is not None else None  # (rows, r): g B_e s
                if want_x:
                    gx = g @ w.t() if weight.transposed else g @ w
                    if gb is not None:
                        gx.addmm_(gb, lora[0][e])
                    grad_x[s:stop] = gx
                if want_a or want_b:
                    xb = x[s:stop].to(dtype)
                    if want_a:
                        grad_a[e].addmm_(gb.t(), xb)
                    if want_b:
                        grad_b[e].addmm_(g.t(), xb @ lora[0][e].t(), alpha=weight.scaling)
            start += n
        if grad_a is not None:
            grad_a = grad_a.view(-1, weight.in_features).to(weight.lora_A.dtype)
        if grad_b is not None:
            grad_b = grad_b.permute(1, 2, 0).reshape(weight.out_features, -1).to(weight.lora_B.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def grouped_product(weight: ExpertWeight4bit, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's product (adapter included) for `x`'s rows sorted by expert, `counts[e]` rows for expert e
    (`_GroupedExperts`). In a gradient-checkpointed region that keeps outputs (layers/kept_outputs.py), the
    recompute takes the first run's output instead of computing it again."""
    region = kept_outputs.current()
    kept = region.take(weight) if region is not None else None
    y = _GroupedExperts.apply(x, weight.lora_A, weight.lora_B, weight, counts, kept)
    if region is not None and kept is None:
        region.keep(weight, y)
    return y


def _route(top_k_index: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The (token, choice) pairs sorted by expert (stable: within an expert, in token order), as their token
    indices, their choice (position in top k), their expert, and the count of pairs per expert. Indices
    past the last expert (expert parallelism's sentinels) sort last and are dropped."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    expert, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=experts), minlength=experts + 1)[:experts].tolist()
    routed = sum(counts)
    order, expert = order[:routed], expert[:routed]
    return order // k, order % k, expert, counts


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward (its gating and biases) over `ExpertWeight4bit` weights, grouped: the
    (token, expert) pairs sorted by expert once, each projection one `grouped_product` over all of them
    (each routed expert decoded once per pass, its adapter in the same pass, experts with no tokens
    skipped), the activation, biases and routing weights applied to all pairs at once."""
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = getattr(self, up_name), self.down_proj
    with torch.no_grad():
        token, position, expert, counts = _route(top_k_index, up.num_experts)
    h = grouped_product(up, hidden_states[token], counts)
    if self.has_bias:
        h = h + getattr(self, f"{up_name}_bias")[expert]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    y = grouped_product(down, h, counts)
    if self.has_bias:
        y = y + self.down_proj_bias[expert]
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    y = y * top_k_weights[token, position, None]
    return torch.zeros_like(hidden_states).index_add_(0, token, y.to(hidden_states.dtype))


def experts_forward_reference(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch reference of `experts_forward`: transformers' eager loop, one expert at a time
    (`ExpertWeight4bit.forward`, its adapter through autograd), only the experts some token is routed to."""
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = getattr(self, up_name), self.down_proj
    up_bias = getattr(self, f"{up_name}_bias") if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    experts = up.num_experts
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)  # (experts+1, k, tokens)
        hit = (mask[:experts].sum(dim=(-1, -2)) > 0).nonzero().view(-1).tolist()
    for e in hit:
        position, token = torch.where(mask[e])
        h = up(hidden_states[token], e)
        if up_bias is not None:
            h = h + up_bias[e]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = down(h, e)
        if down_bias is not None:
            y = y + down_bias[e]
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        y = y * top_k_weights[token, position, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def register() -> None:
    """Make `EXPERTS_IMPLEMENTATION` a name transformers' experts modules can be switched to."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
    ExpertsInterface.register(REFERENCE_IMPLEMENTATION, experts_forward_reference)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` holding fused 3-D expert parameters (or, once swapped, `ExpertWeight4bit`s)."""
    found = {}
    for name, module in model.named_modules():
        held = [getattr(module, p, None) for p in EXPERT_PARAMETERS]
        if any(isinstance(t, ExpertWeight4bit) or (isinstance(t, nn.Parameter) and t.dim() == 3) for t in held):
            found[name] = module
    return found


def expert_weights(model: nn.Module) -> dict[str, ExpertWeight4bit]:
    """Every `ExpertWeight4bit` of `model`, by its name (e.g. "model.layers.0.mlp.experts.gate_up_proj")."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertWeight4bit)}


# What transformers' `@use_experts_implementation` sets on an experts module: the layout flags the forward reads.
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed")


def _layout_gaps(module: nn.Module) -> list[str]:
    """What an experts module lacks of the layout `experts_forward` computes (empty: none)."""
    gaps = [f"the {flag} flag of transformers' @use_experts_implementation" for flag in _LAYOUT_FLAGS
            if not hasattr(module, flag)]
    if gaps:
        return gaps
    up = "gate_up_proj" if module.has_gate else "up_proj"
    wanted = [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if module.has_bias else [])
    return [f"a {name} parameter" for name in wanted if getattr(module, name, None) is None]


def check_expert_layouts(model: nn.Module) -> dict[str, nn.Module]:
    """The experts modules of `model`, after refusing (in one sentence) any whose layout nf4tune cannot compute:
    before a weight is read, rather than a model whose experts would stay 16-bit without adapters."""
    found = experts_modules(model)
    for name, module in found.items():
        gaps = _layout_gaps(module)
        if gaps:
            raise Nf4tuneError(
                f"{name} ({type(module).__name__}) is a mixture-of-experts module whose layout nf4tune does not know: "
                f"it lacks {' and '.join(gaps)}; nf4tune quantizes the experts modules of transformers' MoE families."
            )
    for key, param in model.named_parameters():
        owner, _, attr = key.rpartition(".")
        if param.dim() == 3 and "expert" in key and not (owner in found and attr in EXPERT_PARAMETERS + tuple(
                f"{p}_bias" for p in EXPERT_PARAMETERS)):
            raise Nf4tuneError(
                f"{owner} holds the 3-D expert parameter {attr!r}, a mixture-of-experts layout nf4tune does not know "
                f"(it lacks the fused {' / '.join(EXPERT_PARAMETERS)} parameters transformers' experts modules have)."
            )
    return found


def swap_experts(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, ExpertWeight4bit]:
    """Replace every fused expert parameter of `model` (on the meta device) by an empty `ExpertWeight4bit`
    and switch the experts modules to `experts_forward`. Returns them by parameter name ({} for a dense model)."""
    found = check_expert_layouts(model)
    if not found:
        return {}
    register()
    swapped = {}
    for name, module in found.items():
        for attr in EXPERT_PARAMETERS:
            param = module._parameters.get(attr)
            if param is None:
                continue
            weight = ExpertWeight4bit(param.shape, bool(module.is_transposed), compute_dtype)
            del module._parameters[attr]  # a module under the parameter's name takes its place
            module.add_module(attr, weight)
            swapped[f"{name}.{attr}"] = weight
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return swapped
