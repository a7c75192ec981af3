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


@pytest.mark.parametrize("kind", ["causal", "sliding"])
def test_soft_capped_attention_of_bf16_inputs_computes_in_float32_when_asked(kind):
    """bf16 q, k, v with the products in float32 (the CPU training path without AMX): closer to float64 than
    the same attention computed in bf16, output and gradients in bf16."""
    q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in inputs())
    allowed = masks(q.shape[2], kind)
    want = reference(q, k, v, allowed, 0.3, 2.0)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        out = ca.chunked_attention(q, k, v, allowed, 0.3, 2.0, block=6, dtype=dtype)
        got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got)
        errors[dtype] = [(a.double() - b).abs().mean().item() for a, b in zip((out, *got), (want, *ref))]
    # the mean error: the largest is one bf16 rounding of the result either way; float32 products halve the mean
    assert all(f < 0.75 * b for f, b in zip(errors[torch.float32], errors[torch.bfloat16])), errors


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


# --- nf4tune models: selection, tiled MLP, kept-outputs budget ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from nf4tune.checkpoint.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("long") / "m")


def lora_model(path, dropout=0.1):
    import nf4tune

    model, _ = nf4tune.load_model(path, device="cpu", compute_dtype=torch.float32, progress=False,
                                  lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=dropout))
    for name, p in model.named_parameters():  # B starts at zero: give the adapters something to differentiate
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model.train()


def test_load_model_selects_chunked_attention_and_tiles_the_mlps(tiny_checkpoint):
    from nf4tune.layers.tiled_mlp import TiledMLP

    model = lora_model(tiny_checkpoint)
    assert model.config._attn_implementation == ca.NAME
    mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]
    assert mlps and all(isinstance(m, TiledMLP) for m in mlps)


def mlp_step(mlp, x, weights, seed):
    """(output, input grad, parameter grads) of sum(mlp(x) * weights), the RNG seeded first."""
    mlp.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = mlp(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}


def assert_same(got, want):
    (out1, gx1, g1), (out0, gx0, g0) = got, want
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gx1, gx0)
    assert g0 and g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_tiled_mlp_equals_the_untiled_one(tiny_checkpoint, monkeypatch, dropout):
    """Values and every gradient (LoRA A and B, the input). Without dropout against the MLP untiled; with
    LoRA dropout against the MLP run chunk by chunk under autograd with the same random state (the tiles
    draw their masks per chunk, and backward must replay exactly those)."""
    from nf4tune.layers import tiled_mlp

    model = lora_model(tiny_checkpoint, dropout=dropout)
    mlp = next(m for n, m in model.named_modules() if n.endswith(".mlp"))
    x = torch.randn(2, 23, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 23, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(tiled_mlp, "CHUNK_TOKENS", 5)
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 10**9)
    if dropout:
        untiled = super(tiled_mlp.TiledMLP, mlp).forward
        flat_forward = lambda x: torch.cat([untiled(part) for part in x.reshape(-1, x.shape[-1]).split(5)]).reshape(  # noqa: E731
            *x.shape[:-1], -1)
        monkeypatch.setattr(mlp, "forward", flat_forward)
    want = mlp_step(mlp, x, weights, seed=7)
    monkeypatch.undo()
    monkeypatch.setattr(tiled_mlp, "CHUNK_TOKENS", 5)
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 4)
    assert_same(mlp_step(mlp, x, weights, seed=7), want)


def test_a_long_training_step_equals_the_short_path_one(tiny_checkpoint, monkeypatch):
    """A whole checkpointed nf4tune step with padding: long-sequence layers (blockwise attention, tiled MLP,
    shrunk kept-outputs budget) against the same model with every threshold out of reach."""
    from nf4tune.layers import kept_outputs, tiled_mlp
    from nf4tune.models.loss import loss_sum

    model = lora_model(tiny_checkpoint, dropout=0.0)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 6] = -100  # predicted from a padding position, whose output each implementation leaves as it likes
    results = []
    for long in (False, True):
        monkeypatch.setattr(ca, "LONG_TOKENS", 16 if long else 10**9)
        monkeypatch.setattr(ca, "BLOCK", 8)
        monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 16 if long else 10**9)
        monkeypatch.setattr(tiled_mlp, "CHUNK_TOKENS", 24)
        monkeypatch.setattr(kept_outputs, "FULL_BUDGET_TOKENS", 16 if long else 10**9)
        model.zero_grad(set_to_none=True)
        total, count = loss_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        (total / count).backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (t0, g0), (t1, g1) = results
    torch.testing.assert_close(t1, t0, atol=1e-4, rtol=1e-5)
    assert g0 and g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_kept_outputs_budget_follows_the_length():
    from nf4tune.layers.kept_outputs import FULL_BUDGET_TOKENS, budget_bytes

    full = budget_bytes(1.0, FULL_BUDGET_TOKENS)
    assert full == budget_bytes(1.0, 16) == 2**30
    assert budget_bytes(1.0, 2 * FULL_BUDGET_TOKENS) == full // 2
    assert budget_bytes(1.0, 8 * FULL_BUDGET_TOKENS) == full // 8
    assert budget_bytes(0.0, 8 * FULL_BUDGET_TOKENS) == 0


def test_a_long_step_keeps_fewer_outputs(tiny_checkpoint, monkeypatch):
    """The regions of a step longer than FULL_BUDGET_TOKENS keep 4-bit outputs within the shrunk budget."""
    from nf4tune.layers import kept_outputs

    model = lora_model(tiny_checkpoint, dropout=0.0)
    ids = torch.randint(3, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(6))
    held = {}
    for full_tokens in (10**6, 16):
        monkeypatch.setattr(kept_outputs, "FULL_BUDGET_TOKENS", full_tokens)
        model.nf4tune.kept_outputs_gib = 40_000 / 2**30  # about the outputs of two layers at 64 tokens
        out = model.model(input_ids=ids, use_cache=False).last_hidden_state
        held[full_tokens] = kept_outputs.kept_bytes(kept_outputs.MATMUL)
        out.sum().backward()
        assert kept_outputs.kept_bytes() == 0
    assert 0 < held[16] <= 40_000 * 16 / 64 < held[10**6]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_long_chunk_after_a_cache_attends_as_eager(monkeypatch, family):
    """A long prefill continuing a KV cache (query offset, keys longer than queries) gives eager's logits."""
    from transformers import DynamicCache

    monkeypatch.setattr(ca, "LONG_TOKENS", 8)
    monkeypatch.setattr(ca, "BLOCK", 4)
    ca.register()
    model = tiny(family).eval()
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(8))
    logits = []
    for impl in ("eager", ca.NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :20], cache=cache, use_cache=True)
            logits.append(model(input_ids=ids[:, 20:], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_kept_causal_attention_skips_its_recompute_with_the_same_gradients(tmp_path, monkeypatch, kv_heads):
    """Under checkpointing with kept outputs, the CPU flash kernel's output and log-sum-exp are kept: the
    recompute runs no attention forward, and the gradients are plain checkpointing's (no outputs kept)."""
    from nf4tune.checkpoint.tiny import build_tiny_checkpoint
    from nf4tune.models.loss import loss_sum

    extra = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    model = lora_model(build_tiny_checkpoint(tmp_path / "m", **extra), dropout=0.1)
    forward, backward = ca._flash_cpu()
    calls = []
    monkeypatch.setattr(ca, "_flash_cpu", lambda: (lambda *a, **k: calls.append(1) or forward(*a, **k), backward))
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = []
    for gib in (0.0, 1.0):
        model.nf4tune.kept_outputs_gib = gib
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(11)
        total, count = loss_sum(model, batch_)
        (total / count).backward()
        results.append((total.detach(), len(calls), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}))
    (t0, calls0, g0), (t1, calls1, g1) = results
    assert calls0 == 0 and calls1 == model.config.num_hidden_layers  # once per layer: the first run only
    torch.testing.assert_close(t1, t0)
    assert g0 and g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-4, msg=name)


def test_attention_is_kept_when_the_4bit_outputs_budget_is_spent(tmp_path, monkeypatch):
    """Attention keeps beyond the shared budget: with the 4-bit outputs' share at nothing (a long step's shrunk
    budget, spent), every layer's recompute still skips its attention forward, and the 4-bit outputs are
    recomputed (none kept)."""
    from nf4tune.checkpoint.tiny import build_tiny_checkpoint
    from nf4tune.layers import kept_outputs
    from nf4tune.models.loss import loss_sum

    model = lora_model(build_tiny_checkpoint(tmp_path / "m", num_key_value_heads=1), dropout=0.0)
    monkeypatch.setattr(kept_outputs, "budget_bytes", lambda gib, tokens: 0)
    forward, backward = ca._flash_cpu()
    calls = []
    monkeypatch.setattr(ca, "_flash_cpu", lambda: (lambda *a, **k: calls.append(1) or forward(*a, **k), backward))
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    held = {pool: kept_outputs.kept_bytes(pool) for pool in (kept_outputs.MATMUL, kept_outputs.ATTENTION)}
    (total / count).backward()
    assert len(calls) == model.config.num_hidden_layers  # the first run only, in every layer
    assert held[kept_outputs.MATMUL] == 0 and held[kept_outputs.ATTENTION] > 0
    assert kept_outputs.kept_bytes() == 0  # all handed back
    # `nf4tune estimate --device cpu` counts what was kept: each layer's output and float32 log-sum-exp
    from nf4tune.plan.estimate import kept_attention_bytes, model_sizes

    sizes = model_sizes(str(tmp_path / "m"))
    width = 4  # lora_model computes in float32
    assert kept_attention_bytes(sizes, width, ids.numel(), "cpu") == held[kept_outputs.ATTENTION]
    assert kept_attention_bytes(sizes, width, ids.numel(), "cuda") == 0


def test_4bit_outputs_give_way_to_attention():
    """A 4-bit output is kept only while everything kept (attention's included) fits the shared budget;
    attention's while attention's alone fit theirs."""
    from nf4tune.layers.kept_outputs import ATTENTION, KeptOutputs, kept_bytes

    region, module = KeptOutputs(100, 1000), object()
    for nbytes, pool in ((80, ATTENTION), (30, "matmul"), (20, "matmul"), (200, ATTENTION), (1, "matmul")):
        region.keep(module, torch.zeros(nbytes, dtype=torch.uint8), pool)
    assert [entry[1] is not None for entry in region.entries] == [True, False, True, True, False]
    assert kept_bytes(ATTENTION) == 280 and kept_bytes() == 300
    region.clear()
    assert kept_bytes() == 0


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("one_head_at_a_time", [False, True])
def test_causal_flash_in_either_dtype_matches_float64(monkeypatch, compute, kv_heads, one_head_at_a_time):
    """bf16 q, k, v through the CPU flash kernel computing in bf16 or float32 (what
    `dispatch.training_attention_dtype` chooses between; converted all heads at once or a key/value head at a
    time): output and gradients in bf16 against a float64 causal softmax attention (eager's), the float32
    products no less accurate than the bf16 ones."""
    if one_head_at_a_time:
        monkeypatch.setattr(ca, "CONVERT_BYTES", 1)
        assert len(ca._head_chunks(*inputs(kv_heads=kv_heads)[:2], torch.float64)) == kv_heads
    errors = {}
    for dtype in (torch.bfloat16, compute):
        q, k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in inputs(kv_heads=kv_heads))
        allowed = masks(q.shape[2], "causal")
        out = ca._KeptCausalFlash.apply(q, k, v, 0.3, None, dtype)
        assert out.dtype == torch.bfloat16
        want = reference(q, k, v, allowed, 0.3)
        grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        ref = torch.autograd.grad(want, (q, k, v), grad)
        assert all(g.dtype == torch.bfloat16 for g in got)
        pairs = zip((out.detach(), *got), (want.detach(), *ref))
        errors[dtype] = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in pairs]
    assert max(errors[compute]) < 2e-2, errors
    for e, e_bf16 in zip(errors[compute], errors[torch.bfloat16]):
        assert e <= 1.25 * e_bf16 + 1e-3, errors


@pytest.mark.parametrize("setting,kept_gib,padded", [("bfloat16", 1.0, False), ("float32", 1.0, False),
                                                     ("float32", 0.0, False), ("bfloat16", 1.0, True),
                                                     ("float32", 1.0, True)])
def test_a_bf16_model_trains_as_eager_does_with_either_attention_dtype(tmp_path, monkeypatch, setting, kept_gib,
                                                                        padded):
    """A bf16 nf4tune model's attention in the dtype NF4TUNE_TRAIN_MATMUL / `dispatch.training_attention_dtype`
    names (a causal batch: the CPU flash kernel, its outputs kept through the checkpoint or not; a padded long one:
    the query-blocked SDPA): its loss and LoRA gradients hold to a float32 eager oracle (the same 4-bit weights in
    float32) as closely as bf16 eager attention's do."""
    import nf4tune
    from nf4tune import dispatch
    from nf4tune.checkpoint.tiny import build_tiny_checkpoint
    from nf4tune.models.loss import loss_sum

    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, setting)
    path = build_tiny_checkpoint(tmp_path / "m", num_key_value_heads=1)
    forward, backward = ca._flash_cpu()
    seen = []
    monkeypatch.setattr(ca, "_flash_cpu", lambda: (lambda q, *a, **k: seen.append(q.dtype) or forward(q, *a, **k),
                                                   backward))
    if padded:  # long from 8 tokens: the padded batch takes the query-blocked SDPA
        monkeypatch.setattr(ca, "LONG_TOKENS", 8)
        blocked = ca.blocked_sdpa
        monkeypatch.setattr(ca, "blocked_sdpa", lambda *a, dtype, **k: seen.append(dtype) or blocked(*a, dtype=dtype, **k))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    batch_ = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def step(dtype, impl):
        model, _ = nf4tune.load_model(path, device="cpu", compute_dtype=dtype, progress=False,
                                      lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
        for i, (name, p) in enumerate(model.named_parameters()):  # the same adapters in every load
            if "lora_" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        model.set_attn_implementation(impl)
        model.nf4tune.kept_outputs_gib = kept_gib
        total, count = loss_sum(model.train(), batch_)
        (total / count).backward()
        return total.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    oracle = step(torch.float32, "eager")
    eager = step(torch.bfloat16, "eager")
    seen.clear()
    ours = step(torch.bfloat16, ca.NAME)
    assert seen and set(seen) == {getattr(torch, setting)}  # the kernel ran, in the chosen dtype

    def error(result):
        return max([float((result[0] - oracle[0]).abs() / oracle[0].abs())] +
                   [float((result[1][n] - g).abs().max() / g.abs().max()) for n, g in oracle[1].items()])

    assert ours[1].keys() == oracle[1].keys()
    assert error(ours) < 0.05
    assert error(ours) <= 1.5 * error(eager) + 1e-3, (error(ours), error(eager))


@pytest.mark.parametrize("kind", KINDS)
def test_query_blocked_sdpa_in_float32_for_bf16_matches_float64(kind):
    """bf16 q, k, v through the query-blocked SDPA (padding, packed rows, sliding windows) computing in bf16 or
    float32: output and gradients against float64 (the rows that attend to something), float32 no less accurate."""
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in inputs())
        allowed = masks(q.shape[2], kind)
        rows = allowed.any(-1).squeeze(1)
        out = ca.blocked_sdpa(q, k, v, allowed, 0.3, block=6, dtype=dtype)
        assert out.dtype == torch.bfloat16
        want = reference(q, k, v, allowed, 0.3)
        grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grad = grad.masked_fill(~rows[:, None, :, None], 0.0)
        got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        ref = torch.autograd.grad(want, (q, k, v), grad)
        assert all(g.dtype == torch.bfloat16 for g in got)
        pairs = zip((out.detach().transpose(1, 2)[rows], *got), (want.detach().transpose(1, 2)[rows], *ref))
        errors[dtype] = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in pairs]
    assert max(errors[torch.float32]) < 2e-2, errors
    for e, e_bf16 in zip(errors[torch.float32], errors[torch.bfloat16]):
        assert e <= 1.25 * e_bf16 + 1e-3, errors
