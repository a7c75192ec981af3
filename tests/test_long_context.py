"""Long sequences: nf4tune's blockwise attention, tiled MLP and kept-outputs budget against their oracles.

The attention kernels are held to a float64 softmax attention (values and gradients) under causal, padded,
packed and sliding-window masks, grouped-query heads and soft-capping; the `nf4tune_chunked` implementation
to transformers' eager attention in whole tiny models (Llama, Mistral's sliding window, Gemma 2's soft cap).
Blocks and the long-sequence threshold are made tiny so that a few dozen tokens cross many blocks.
"""

from __future__ import annotations

import pytest
import torch

from nf4tune.layers import chunked_attention as ca


def reference(q, k, v, allowed, scale, softcap=None):
    """Softmax attention in float64 with keys repeated per group; `allowed` (b, 1, s, t) bool."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)  # padding queries: compared nowhere
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1)
    return probs @ v


def masks(s: int, kind: str) -> torch.Tensor:
    """(2, 1, s, s) bool masks of one kind: the rows of a batch differ."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    causal = j <= i
    if kind == "causal":
        return causal.expand(2, 1, s, s)
    if kind == "padding":  # row 0 left-padded by 5, row 1 right-padded by 3
        keep = torch.ones(2, s, dtype=torch.bool)
        keep[0, :5], keep[1, -3:] = False, False
        return causal & keep[:, None, None, :]
    if kind == "packed":  # documents of 7, 12, rest / 20, rest
        docs = torch.stack([torch.bucketize(torch.arange(s), torch.tensor([7, 19]), right=True),
                            torch.bucketize(torch.arange(s), torch.tensor([20]), right=True)])
        return causal & (docs[:, None, :, None] == docs[:, None, None, :])
    if kind == "sliding":
        return (causal & (i - j < 6)).expand(2, 1, s, s)
    raise ValueError(kind)


def inputs(s=37, heads=4, kv_heads=2, d=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, s, d, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(2, kv_heads, s, d, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(2, kv_heads, s, d, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def check(fn, kind: str, softcap=None, kv_heads=2):
    q, k, v = inputs(kv_heads=kv_heads)
    allowed = masks(q.shape[2], kind)
    rows = allowed.any(-1).squeeze(1)  # queries that attend to something (padding queries are not compared)
    out = fn(q, k, v, allowed, 0.3, softcap)
    want = reference(q, k, v, allowed, 0.3, softcap)
    torch.testing.assert_close(out.transpose(1, 2)[rows].double(), want.transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(want).masked_fill(~rows[:, None, :, None], 0.0)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-5, rtol=1e-5)


KINDS = ("causal", "padding", "packed", "sliding")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_online_softmax_attention_matches_float64(kind, kv_heads):
    check(lambda q, k, v, m, scale, cap: ca.chunked_attention(q, k, v, m, scale, cap, block=5), kind, kv_heads=kv_heads)


@pytest.mark.parametrize("kind", ["causal", "padding", "sliding"])
def test_online_softmax_attention_soft_caps_like_float64(kind):
    check(lambda q, k, v, m, scale, cap: ca.chunked_attention(q, k, v, m, scale, cap, block=6), kind, softcap=2.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_query_blocked_sdpa_matches_float64(kind, kv_heads):
    check(lambda q, k, v, m, scale, cap: ca.blocked_sdpa(q, k, v, m, scale, block=6), kind, kv_heads=kv_heads)


def test_blockwise_mask_skips_blocks_the_mask_leaves_empty(monkeypatch):
    """A causal mask's blocks above the diagonal are never computed: half the score blocks (plus the diagonal)."""
    from transformers.masking_utils import causal_mask_function

    mask = ca.BlockwiseMask(1, 40, 40, 0, 0, causal_mask_function, None, False, torch.device("cpu"), True)
    seen = []
    real = ca._scores
    monkeypatch.setattr(ca, "_scores", lambda *a: seen.append(None) or real(*a))
    q, k, v = inputs(s=40)
    ca.chunked_attention(q[:1], k[:1], v[:1], mask, block=10)
    assert len(seen) == 4 * 5 // 2


# --- whole models: nf4tune_chunked against eager ------------------------------------------------------------

def tiny(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"llama": {}, "mistral": {"sliding_window": 6},
             "gemma2": {"sliding_window": 6, "attn_logit_softcapping": 3.0, "final_logit_softcapping": None,
                        "query_pre_attn_scalar": 8, "head_dim": 8}}[family]
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  attention_dropout=0.0, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def batch(kind: str, s=30):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, s), generator=gen)
    if kind == "padding":
        mask = torch.ones(2, s, dtype=torch.long)
        mask[0, :4] = 0
        return {"input_ids": ids, "attention_mask": mask}, mask.bool()
    if kind == "packed":  # two rows of packed documents, positions restarting at each (what train/data.py makes)
        pos = torch.cat([torch.arange(11), torch.arange(s - 11)]), torch.cat([torch.arange(17), torch.arange(s - 17)])
        return {"input_ids": ids, "position_ids": torch.stack(pos)}, torch.ones(2, s, dtype=torch.bool)
    return {"input_ids": ids}, torch.ones(2, s, dtype=torch.bool)


def run(model, inputs_):
    model.zero_grad(set_to_none=True)
    out = model(**inputs_, use_cache=False).logits
    return out


@pytest.mark.parametrize("family,kind", [("llama", "causal"), ("llama", "padding"), ("llama", "packed"),
                                         ("mistral", "causal"), ("mistral", "padding"), ("gemma2", "causal"),
                                         ("gemma2", "packed")])
def test_models_train_the_same_with_chunked_attention_as_with_eager(monkeypatch, family, kind):
    monkeypatch.setattr(ca, "LONG_TOKENS", 8)
    monkeypatch.setattr(ca, "BLOCK", 4)
    ca.register()
    model = tiny(family)
    inputs_, real = batch(kind)
    weights = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(2)) * real[..., None]
    results = []
    for impl in ("eager", ca.NAME):
        model.set_attn_implementation(impl)
        out = run(model, inputs_)
        (out * weights).sum().backward()
        results.append((out[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_short_sequences_use_sdpas_own_mask():
    """Below the threshold the mask is sdpa's (a tensor or None), so short batches run sdpa's path unchanged."""
    from transformers.masking_utils import causal_mask_function

    short = ca.attention_mask(1, 16, 16, mask_function=causal_mask_function, attention_mask=torch.ones(1, 16).bool())
    long = ca.attention_mask(1, ca.LONG_TOKENS, ca.LONG_TOKENS, mask_function=causal_mask_function,
                             attention_mask=torch.ones(1, ca.LONG_TOKENS).bool())
    assert short is None and isinstance(long, ca.BlockwiseMask) and long.plain_causal
