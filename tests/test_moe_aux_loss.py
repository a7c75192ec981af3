"""A mixture of experts' router load-balancing loss (`model.output_router_logits`, transformers' name): nf4tune's
chunked training loss plus it equals transformers' own loss with `output_router_logits=True` on the same 4-bit
model, gradients included; a dense model refuses the option in one sentence."""

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.errors import Nf4tuneError
from nf4tune.models.loss import enable_router_aux_loss, loss_sum


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_training_loss_adds_the_router_loss_as_transformers_does(tmp_path, arch):
    path = build_tiny_checkpoint(tmp_path / arch, arch, dtype=torch.float32)
    model, _ = nf4tune.load_model(path, compute_dtype=torch.float32, device="cpu", progress=False,
                                  lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: the router loss counts only real tokens, as transformers does
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    plain, count = loss_sum(model, batch)

    enable_router_aux_loss(model)
    total, count = loss_sum(model, batch)
    reference = model(**batch, output_router_logits=True, use_cache=False)
    assert reference.aux_loss is not None and float(reference.aux_loss) > 0
    assert float(total / count) == pytest.approx(float(reference.loss), rel=1e-5)
    assert float(total - plain) == pytest.approx(float(model.router_aux_loss_coef * reference.aux_loss * count), rel=1e-4)

    ours = torch.autograd.grad(total / count, [p for p in model.parameters() if p.requires_grad])
    theirs = torch.autograd.grad(reference.loss, [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_without_routers_refuses_the_option(tmp_path):
    model, _ = nf4tune.load_model(build_tiny_checkpoint(tmp_path / "llama", "llama"), device="cpu", progress=False)
    with pytest.raises(Nf4tuneError, match="has no router load-balancing loss"):
        enable_router_aux_loss(model)
