"""LoRA dropout: Bernoulli(p) per element, inverted scaling, and the right gradient."""

import math

import torch

from nf4tune.layers.dropout import LoraDropout, dropped_positions


def test_each_position_is_dropped_independently_with_probability_p():
    torch.manual_seed(0)
    n, trials, p = 500, 4000, 0.05
    hits = torch.zeros(trials, n)
    for t in range(trials):
        hits[t, dropped_positions(n, p, torch.device("cpu"))] = 1
    sd = math.sqrt(p * (1 - p) / trials)
    assert abs(hits.mean().item() - p) < 4 * sd / math.sqrt(n)
    assert (hits.mean(0) - p).abs().max() < 5 * sd  # no position favoured (the ends included)
    neighbours = torch.corrcoef(torch.stack([hits[:, :-1].reshape(-1), hits[:, 1:].reshape(-1)]))[0, 1]
    assert abs(neighbours) < 0.01
    big = dropped_positions(3_000_000, 0.1, torch.device("cpu"))
    assert big.unique().numel() == big.numel() and 0 <= big.min() and big.max() < 3_000_000
    assert abs(big.numel() / 3_000_000 - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 3_000_000)


def test_mask_gradient_and_eval():
    x = torch.randn(64, 300, dtype=torch.bfloat16, requires_grad=True)
    drop = LoraDropout(0.1).train()
    y, scale = drop(x)
    assert y.dtype == torch.bfloat16 and scale == 1 / 0.9
    kept = y != 0
    assert torch.equal(y[kept], x[kept])  # the mask is exactly 0 or 1; the scale is applied by the caller
    y.sum().backward()
    assert torch.equal(x.grad, kept.to(torch.bfloat16))
    out, scale = drop.eval()(x)
    assert out is x and scale == 1.0
    heavy, scale = LoraDropout(0.5).train()(torch.ones(10000))  # per-element mask path
    assert set(heavy.unique().tolist()) <= {0.0, 1.0} and 0.45 < (heavy == 0).float().mean() < 0.55 and scale == 2.0
