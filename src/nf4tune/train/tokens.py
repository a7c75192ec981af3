"""New tokens: grow the vocabulary, start the new rows at the mean of the old ones, train only them."""

from __future__ import annotations

import torch
from torch import nn

from ..models.vocab import grow_rows, vocab_modules

# training.embedding_learning_rate's default floor: the new rows of the real SmolLM2 learned a token
# used in every answer with it (tests/test_new_tokens.py), and not with the adapters' 2e-4 to 1e-3.
DEFAULT_EMBEDDING_LEARNING_RATE = 5e-3


def new_token_learning_rate(training) -> float:
    """The learning rate of added tokens' rows: `training.embedding_learning_rate`, by default the larger
    of DEFAULT_EMBEDDING_LEARNING_RATE and the adapters' learning rate."""
    if training.embedding_learning_rate is not None:
        return training.embedding_learning_rate
    return max(DEFAULT_EMBEDDING_LEARNING_RATE, training.learning_rate)


def parameter_groups(model, training) -> list[dict]:
    """The optimizer's parameter groups: the adapters (with `training.weight_decay`), and the
    vocabulary matrices of added tokens (no decay: it would move the frozen old rows; their own
    learning rate, `new_token_learning_rate`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    vocab = [p for p in params if p.dim() == 2 and p.shape[0] == vocab_rows] \
        if getattr(model, "nf4tune_new_tokens_from", None) is not None else []
    groups = [{"params": [p for p in params if all(p is not v for v in vocab)], "weight_decay": training.weight_decay}]
    if vocab:
        groups.append({"params": vocab, "weight_decay": 0.0, "lr": new_token_learning_rate(training)})
    return groups


def add_tokens_to_tokenizer(tokenizer, tokens: list[str], special_tokens: list[str]) -> None:
    """Add `tokens` and `special_tokens` to the tokenizer (before the data is tokenized with it)."""
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": special_tokens}, replace_extra_special_tokens=False)


def grow_vocab(model, size: int) -> int:
    """Grow the model's vocabulary to `size` rows for tokens added to its tokenizer. The new
    embedding (and output head) rows start at the mean of the existing rows, as the QLoRA code does,
    and become trainable in float32 while the old rows stay frozen. Returns the number of rows added."""
    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return 0
    grow_rows(model, size)
    train_new_rows(model, old)
    return size - old


def train_new_rows(model, first_new: int) -> None:
    """Make the vocabulary matrices float32 and trainable, with gradients kept only on rows >= first_new.
    Activations stay in the compute dtype: the embedding output is cast back, the head's input up."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    compute = embed.weight.dtype if embed.weight.dtype != torch.float32 else None
    for module in vocab_modules(model):
        module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=True)
        mask = torch.zeros(module.weight.shape[0], 1, device=module.weight.device)
        mask[first_new:] = 1
        module.weight.register_hook(lambda g, mask=mask: g * mask)
    if tied:
        head.weight = embed.weight
    if compute is not None:
        embed.register_forward_hook(lambda m, args, out: out.to(compute))
        if head is not None:
            head.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype),) + tuple(args[1:]))
    model.nf4tune_new_tokens_from = first_new
