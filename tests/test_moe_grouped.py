"""The grouped experts pass (`experts_forward`: tokens sorted by expert, each routed expert decoded once per
pass, its adapter in the same pass, a custom backward) against the plain-PyTorch loop it replaces
(`experts_forward_reference`: one expert at a time, the adapter through autograd): values and gradients."""

from __future__ import annotations

import pytest
import torch

from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers import LoraConfig
from nf4tune.layers import experts4bit as ex
from nf4tune.models.load import load_model

IDS = torch.tensor([[1, 40, 41, 42, 15, 77, 90, 3, 60, 33], [1, 55, 23, 78, 9, 10, 11, 12, 13, 14]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped")
    # qwen3_moe: gate_up (experts, out, in), no bias; gpt_oss: transposed (experts, in, out), biases, its own gate
    return {family: build_tiny_checkpoint(root / family, family) for family in ("qwen3_moe", "gpt_oss")}


def _load(path, dtype=torch.float32, **kwargs):
    model = load_model(path, compute_dtype=dtype, device="cpu", progress=False,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0), **kwargs)[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _step(model, implementation):
    """The loss and the adapters' gradients of one forward + backward under `implementation`."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(ours, theirs, rel):
    scale = theirs.abs().max().clamp_min(1e-12)
    assert ((ours - theirs).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_grouped_pass_equals_the_reference_loop(checkpoints, family, dtype, rel):
    model = _load(checkpoints[family], dtype)
    model.train()
    loss, grads = _step(model, ex.EXPERTS_IMPLEMENTATION)
    ref_loss, ref_grads = _step(model, ex.REFERENCE_IMPLEMENTATION)
    _assert_close(loss, ref_loss, rel)
    assert grads.keys() == ref_grads.keys() and any(".experts." in n for n in grads)
    for name in grads:
        _assert_close(grads[name], ref_grads[name], rel)


def test_grouped_pass_under_checkpointing_keeps_the_gradients(checkpoints):
    """Gradient checkpointing that keeps the experts' outputs (the recompute takes them) changes nothing."""
    plain = _load(checkpoints["qwen3_moe"], gradient_checkpointing=False)
    kept = _load(checkpoints["qwen3_moe"])
    plain.train(), kept.train()
    loss, grads = _step(kept, ex.EXPERTS_IMPLEMENTATION)
    ref_loss, ref_grads = _step(plain, ex.REFERENCE_IMPLEMENTATION)
    _assert_close(loss, ref_loss, 1e-5)
    for name in grads:
        _assert_close(grads[name], ref_grads[name], 1e-5)


def _experts(model):
    return next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_idle_experts_and_sentinels(checkpoints, family):
    """Experts no token is routed to are skipped (their adapters get zero gradient), and indices past the last
    expert (expert parallelism's sentinels) contribute nothing: as in the reference loop."""
    experts = _experts(_load(checkpoints[family]))
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    n, hidden = up.num_experts, up.in_features
    gen = torch.Generator().manual_seed(1)
    index = torch.tensor([[1, 3], [3, 1], [1, n], [n, 3], [3, 1], [1, 3], [n, n]])  # experts 1 and 3 only
    weights = torch.rand(index.shape, generator=gen)
    results = []
    for forward in (ex.experts_forward, ex.experts_forward_reference):
        experts.zero_grad(set_to_none=True)
        x = torch.randn(index.shape[0], hidden, generator=torch.Generator().manual_seed(2)).requires_grad_()
        y = forward(experts, x, index, weights)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {p: w.grad.clone() for p, w in experts.named_parameters() if w.requires_grad}
        results.append((y.detach(), x.grad, grads))
    (y, gx, grads), (ref_y, ref_gx, ref_grads) = results
    assert y[-1].abs().max() == 0 and gx[-1].abs().max() == 0  # a token routed nowhere
    _assert_close(y, ref_y, 1e-5)
    _assert_close(gx, ref_gx, 1e-5)
    for name, grad in grads.items():
        _assert_close(grad, ref_grads[name], 1e-5)
    a = grads["gate_up_proj.lora_A" if experts.has_gate else "up_proj.lora_A"].view(n, -1, hidden)
    assert a[[1, 3]].abs().sum() > 0 and a[[0, 2]].abs().sum() == 0


def test_grouped_pass_without_adapters(checkpoints):
    """A base without adapters (evaluation, or adapters only on attention): the same logits as the loop."""
    model = load_model(checkpoints["qwen3_moe"], compute_dtype=torch.float32, device="cpu", progress=False)[0]
    with torch.no_grad():
        model.set_experts_implementation(ex.EXPERTS_IMPLEMENTATION)
        ours = model(IDS).logits
        model.set_experts_implementation(ex.REFERENCE_IMPLEMENTATION)
        _assert_close(ours, model(IDS).logits, 1e-6)
