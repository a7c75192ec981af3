"""Elo ratings from pairwise matches, averaged over random orders of the matches (as the QLoRA paper and
Chatbot Arena compute them), with percentile intervals over the orders."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Match = tuple[str, str, float]  # (model a, model b, a's score: 1 win, 0.5 tie, 0 loss)


def elo(matches: Sequence[Match], models: Sequence[str], k: float = 32, initial: float = 1000) -> dict[str, float]:
    """Ratings after playing `matches` in the order given: E_a = 1 / (1 + 10^((R_b - R_a) / 400)),
    R_a += K (S_a - E_a), R_b += K ((1 - S_a) - (1 - E_a))."""
    ratings = {m: float(initial) for m in models}
    for a, b, score in matches:
        expected = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / 400))
        ratings[a] += k * (score - expected)
        ratings[b] -= k * (score - expected)
    return ratings


def elo_over_orders(matches: Sequence[Match], models: Sequence[str], orders: int = 10000, seed: int = 0,
                    k: float = 32, initial: float = 1000) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(mean rating, (2.5th, 97.5th) percentile) per model over `orders` random permutations of `matches`,
    all orders played at once as rows of one tensor (the same updates as `elo`, in float64)."""
    models = list(models)
    ratings = torch.full((orders, len(models)), float(initial), dtype=torch.float64)
    if matches:
        index = {m: i for i, m in enumerate(models)}
        a = torch.tensor([index[m[0]] for m in matches])
        b = torch.tensor([index[m[1]] for m in matches])
        s = torch.tensor([float(m[2]) for m in matches], dtype=torch.float64)
        g = torch.Generator().manual_seed(seed)
        perms = torch.argsort(torch.rand(orders, len(matches), generator=g), dim=1)
        rows = torch.arange(orders)
        for t in range(len(matches)):
            j = perms[:, t]
            ai, bi = a[j], b[j]
            expected = 1 / (1 + 10 ** ((ratings[rows, bi] - ratings[rows, ai]) / 400))
            delta = k * (s[j] - expected)
            ratings[rows, ai] += delta
            ratings[rows, bi] -= delta
    mean = ratings.mean(0)
    lo = torch.quantile(ratings, 0.025, dim=0)
    hi = torch.quantile(ratings, 0.975, dim=0)
    return ({m: float(mean[i]) for i, m in enumerate(models)},
            {m: (float(lo[i]), float(hi[i])) for i, m in enumerate(models)})
