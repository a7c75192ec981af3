"""Causal-LM loss from the final hidden states, a chunk of tokens at a time.

Only positions with a label are projected to the vocabulary. Each chunk's gradient with respect to
the hidden states is computed in the forward pass, while its logits exist, and handed back in
backward: the batch x seq x vocab logits tensor never exists, and no logits are recomputed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dispatch
from ..checkpoint.architecture import is_encoder_decoder
from ..dispatch import Compiled
from ..errors import Nf4tuneError
from ..registry import FAMILIES, families

IGNORE_INDEX = -100  # transformers' (and PyTorch's cross_entropy's) label of a position without a loss
# Families whose logits are a linear projection of the last hidden state (then at most divided and
# soft-capped, as LogitTransform declares).
CHUNKED_FAMILIES = frozenset(families("chunked_loss"))


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to its head's output before the loss: divide by `divisor` (Granite),
    then soft-cap, cap * tanh(logits / cap) (Gemma 2). The chunked loss applies it, and its derivative, in
    float32; the identity costs nothing."""

    divisor: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> "LogitTransform":
        """The transform the registry declares for `config`'s family, with the config's values."""
        spec = FAMILIES.get(config.model_type)
        if spec is None:
            return cls()
        divisor = getattr(config, spec.logits_divisor) if spec.logits_divisor else None
        softcap = getattr(config, spec.logits_softcap) if spec.logits_softcap else None
        return cls(1.0 if divisor is None else float(divisor), None if softcap is None else float(softcap))

    @property
    def identity(self) -> bool:
        return self.divisor == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The logits from the head's output `z` (float32 unless the transform is the identity)."""
        if self.identity:
            return z
        x = z.float() / self.divisor
        return x if self.softcap is None else torch.tanh(x / self.softcap) * self.softcap

    def backward(self, grad_logits: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """d loss / d z from d loss / d logits (the chain rule through __call__), in `dtype`."""
        if self.identity:
            return grad_logits
        g = grad_logits.float() / self.divisor
        if self.softcap is not None:  # d/dx cap * tanh(x / cap) = 1 - tanh^2 = 1 - (logits / cap)^2
            g = g * (1 - (logits.float() / self.softcap) ** 2)
        return g.to(dtype)


def _logsumexp_and_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    return torch.logsumexp(x, dim=-1), x.gather(1, targets.unsqueeze(1)).squeeze(1)


def _grad_logits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d (sum of token losses) / d logits = softmax - one-hot, in the logits' dtype."""
    x = logits.float()
    vocab = torch.arange(x.shape[-1], device=x.device)
    return (torch.exp(x - lse.unsqueeze(1)) - (vocab == targets.unsqueeze(1)).float()).to(logits.dtype)


# Vocabulary rows of the head converted to float32 at a time when its products run in float32
# (`dispatch.training_matmul_dtype`): a slice, never the whole vocab x hidden weight.
VOCAB_SLICE = 1024


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h @ weight^T (+ bias), in weight's dtype. Where the frozen products run in float32, a slice of
    the vocabulary at a time in float32, each rounded once into the logits (as the bf16 GEMM rounds
    its float32 sums): the same logits, at the faster GEMM's speed."""
    gemm = dispatch.training_matmul_dtype(h)
    if gemm == weight.dtype:
        return F.linear(h, weight, bias)
    logits = h.new_empty((h.shape[0], weight.shape[0]), dtype=weight.dtype)
    h = h.to(gemm)
    for start in range(0, weight.shape[0], VOCAB_SLICE):
        part = h @ weight[start:start + VOCAB_SLICE].to(gemm).t()
        if bias is not None:
            part += bias[start:start + VOCAB_SLICE].to(gemm)
        logits[:, start:start + VOCAB_SLICE] = part
    return logits


def _grad_head_input(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g @ weight (d loss / d the head's input from d loss / d its output), in weight's dtype; summed
    in float32 over slices of the vocabulary where the frozen products run in float32."""
    gemm = dispatch.training_matmul_dtype(g)
    if gemm == weight.dtype:
        return g @ weight
    total = g.new_zeros((g.shape[0], weight.shape[1]), dtype=gemm)
    for start in range(0, weight.shape[0], VOCAB_SLICE):
        total.addmm_(g[:, start:start + VOCAB_SLICE].to(gemm), weight[start:start + VOCAB_SLICE].to(gemm))
    return total.to(weight.dtype)


# The compiled pair reads the logits twice and writes their gradient once, where cross_entropy's
# autograd makes float32 logits, log-probabilities, a zeroed gradient and its backward: 4-5 passes
# over a tokens x vocab tensor, a third of a small model's step on CPU.
_logsumexp_and_target_fast = Compiled(_logsumexp_and_target)
_grad_logits_fast = Compiled(_grad_logits)


def _chunk(targets: torch.Tensor, start: int, tokens: int) -> torch.Tensor:
    """A chunk's targets as a tensor of its own, not a view: the compiled kernels' guards would otherwise
    tie the view's base size to the logits' rows (torch.compile's duck sizing, seen at a first one-chunk
    sequence), and the first longer sequence would compile them again."""
    return targets[start:start + tokens].clone()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token losses over chunks; d loss / d hidden (and d loss / d head weight, when it
    trains) is computed chunk by chunk in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, transform):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(weight.dtype)
            t = _chunk(targets, start, chunk_tokens)
            logits = transform(_head_logits(h, weight, bias))
            lse, picked = _logsumexp_and_target_fast(logits, t)
            total += (lse - picked).sum()
            g = transform.backward(_grad_logits_fast(logits, lse, t), logits, weight.dtype)
            del logits
            grad_hidden[start:start + chunk_tokens] = _grad_head_input(g, weight)
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_total, None, None, None, None)


def chunked_loss_sum(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_tokens: int = 1024,
                     transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """Sum of the token cross-entropies of `hidden` (tokens x hidden, only positions with a target)
    projected by `head` (the model's output linear) and `transform`ed as the model's forward does, a
    chunk of tokens at a time; float32."""
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_tokens, transform)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        logits = transform(head(hidden[start:start + chunk_tokens].to(head.weight.dtype)))
        lse, picked = _logsumexp_and_target_fast(logits, _chunk(targets, start, chunk_tokens))
        total = total + (lse - picked).sum()
    return total


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None,
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, targets) of the positions that have a next-token label, as transformers'
    `ForCausalLMLoss` pairs them: position t predicts labels[t + 1] (or shift_labels[t] when given)."""
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(hidden.device)
    keep = targets != ignore_index
    return hidden[keep], targets[keep]


def target_count(labels: torch.Tensor, encoder_decoder: bool) -> int:
    """The tokens a batch's loss is taken over: a decoder-only model's position t predicts labels[t + 1],
    so its first label never is a target; an encoder-decoder's decoder predicts every label (its input is
    the labels shifted right behind the start token)."""
    targets = labels if encoder_decoder else labels[:, 1:]
    return int((targets != IGNORE_INDEX).sum())


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens) for one batch."""
    labels = batch["labels"]
    if model.config.model_type not in CHUNKED_FAMILIES:  # T5 and unknown heads: the model's own loss
        # An encoder-decoder builds decoder_input_ids from the labels itself (transformers' _shift_right).
        out = model(**batch, use_cache=False)
        count = target_count(labels, is_encoder_decoder(model.config))
        return out.loss * count, count
    backbone = getattr(model, model.base_model_prefix)
    router = bool(getattr(model.config, "output_router_logits", False))
    # No KV cache: training needs none, and transformers reads packed rows' boundaries from
    # position_ids only when there is no cache.
    out = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False,
                   **({"output_router_logits": True} if router else {}))
    hidden, targets = shifted_targets(out.last_hidden_state, labels)
    total = chunked_loss_sum(hidden, model.get_output_embeddings(), targets, chunk_tokens, LogitTransform.of(model.config))
    if router:  # the mean token loss plus coef x aux, as transformers' MoE heads add it: here as a sum
        total = total + router_aux_loss(model, out.router_logits, batch.get("attention_mask")) * targets.numel()
    return total, targets.numel()


def enable_router_aux_loss(model) -> None:
    """Add a mixture of experts' load-balancing loss to its training loss (transformers' `output_router_logits`),
    or say in one sentence that the model has no router loss."""
    if _balancing_loss(model) is None or not hasattr(model, "router_aux_loss_coef"):
        raise Nf4tuneError(f"model.output_router_logits: {model.config.model_type} has no router load-balancing loss "
                           "(only mixtures of experts do); remove the option.")
    model.config.output_router_logits = True


def _balancing_loss(model):
    """transformers' `load_balancing_loss_func` of the model's own modeling module (each MoE family has one),
    found through the class nf4tune's wrapper derives from."""
    for cls in type(model).__mro__:
        found = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if found is not None:
            return found
    return None


def router_aux_loss(model, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """router_aux_loss_coef x the load-balancing loss, computed by transformers' function for the family, with the
    arguments its CausalLM head passes (tests/test_moe_aux_loss.py holds the sum to transformers' own loss)."""
    aux = _balancing_loss(model)(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)
    return model.router_aux_loss_coef * aux
