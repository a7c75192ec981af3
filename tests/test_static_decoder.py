"""The static-cache decoder (serve/static_decoder.py): its step compiled whole (no graph break, the
cache written in place through the compiled graph) gives the eager step's tokens bit for bit on CPU;
the eager step is held to transformers' forward of the same 4-bit model. The CUDA-graph mode runs
where there is a GPU (and in benchmarks/gpu_report.py)."""

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.serve.sampling import Sampling
from nf4tune.serve.static_decoder import StaticDecoder

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("static") / "llama", **SHAPE)
    model, _ = nf4tune.load_model(path, device="cpu", compute_dtype=torch.bfloat16, progress=False,
                                  lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in sorted(lora_layers(model).items()):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    return model.eval()


def _prompts():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # a shorter, left-padded prompt
    return ids, mask


def test_eager_step_follows_the_transformers_forward(model):
    ids, mask = _prompts()
    decoder = StaticDecoder(model, batch=2, capacity=16)
    for row in range(2):
        prompt = ids[row:row + 1, mask[row].bool()]
        length = prompt.shape[1]
        logits = None
        for t in range(length):
            logits = decoder.step(prompt[:, t].repeat(2), torch.full((2,), t), torch.zeros(2, dtype=torch.long), t)
        with torch.no_grad():
            expected = model(prompt).logits[0, -1].float()
        scale = expected.abs().max()
        assert (logits[0] - expected).abs().max() <= 0.05 * scale  # bf16 compute both ways, different order
        assert torch.equal(logits[0], logits[1])


def test_compiled_step_gives_the_eager_tokens_bit_for_bit(model):
    ids, mask = _prompts()
    eager = StaticDecoder(model, batch=3, capacity=20)
    torch._dynamo.reset()
    compiled = StaticDecoder(model, batch=3, capacity=20, mode="compiled", backend="aot_eager")
    for sampling in (Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, temperature=1.3, seed=4)):
        expected = eager.generate(ids, sampling, attention_mask=mask)
        assert compiled.generate(ids, sampling, attention_mask=mask) == expected
        assert all(len(t) == 8 for t in expected)
    assert torch.equal(compiled.keys, eager.keys) and torch.equal(compiled.values, eager.values)  # written in place
    # the left-padded row decodes as it would alone
    alone = eager.generate(ids[1:, 3:], Sampling(max_new_tokens=8))
    assert alone == [eager.generate(ids, Sampling(max_new_tokens=8), attention_mask=mask)[1]]


def test_graph_mode_needs_a_gpu(model):
    with pytest.raises(ValueError, match="CUDA graphs need the model on a GPU"):
        StaticDecoder(model, batch=1, capacity=8, mode="graphs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_gives_the_compiled_tokens(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "llama", **SHAPE)
    cuda_model, _ = nf4tune.load_model(path, device="cuda", compute_dtype=torch.bfloat16, progress=False)
    ids, mask = _prompts()
    expected = StaticDecoder(cuda_model, 2, 20, mode="eager").generate(ids, Sampling(max_new_tokens=8), attention_mask=mask)
    graphs = StaticDecoder(cuda_model, 2, 20, mode="graphs")
    assert graphs.generate(ids, Sampling(max_new_tokens=8), attention_mask=mask) == expected


def _arch_model(tmp_path, arch: str, **extra):
    """A 4-bit bf16-compute model of `arch` with random q/k/v biases (where it has them)."""
    path = build_tiny_checkpoint(tmp_path / arch, arch, **{**SHAPE, **extra})
    model, _ = nf4tune.load_model(path, device="cpu", compute_dtype=torch.bfloat16, progress=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),                        # grouped-query attention (4 heads, 2 KV heads)
    ("mistral", {"sliding_window": 5}),   # the prompt (11 tokens) and reply run past the window
    ("qwen2", {}),                        # q/k/v biases
])
def test_gemm_prefill_continues_as_the_token_at_a_time_path_and_transformers_generate(tmp_path, arch, extra):
    model = _arch_model(tmp_path, arch, **extra)
    prompt = torch.randint(4, 100, (1, 11), generator=torch.Generator().manual_seed(2))
    decoder = StaticDecoder(model, batch=1, capacity=24)
    # the first decode step's logits: the prompt by one GEMM forward per layer, or token by token
    by_gemm = [decoder.prefill([(0, prompt[0])])]
    by_gemm.append(decoder.step(by_gemm[0].argmax(-1), torch.tensor([11]), torch.tensor([0]), 11))
    by_step = [decoder.step(prompt[:, t], torch.tensor([t]), torch.tensor([0]), t) for t in range(11)][-1:]
    by_step.append(decoder.step(by_step[0].argmax(-1), torch.tensor([11]), torch.tensor([0]), 11))
    for gemm, step in zip(by_gemm, by_step):
        scale = step.abs().max()
        # bf16 rounding: the products and attention sum in another order (measured: 0.5-0.8% of the largest
        # logit, 1-2 bf16 steps; a prefill ignoring the sliding window: 140% of it)
        assert (gemm - step).abs().max() <= 0.02 * scale, ((gemm - step).abs().max(), scale)
    sampling = Sampling(max_new_tokens=8)
    tokens = decoder.generate(prompt, sampling)
    assert tokens == decoder.generate(prompt, sampling, prefill=False)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    assert tokens == [expected[0, 11:].tolist()]


def test_rows_of_different_lengths_decode_as_alone_and_join_a_running_batch(model):
    from nf4tune.serve.batching import Row

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, 100, (n,), generator=gen) for n in (9, 4, 6)]
    samplings = [Sampling(max_new_tokens=6), Sampling(max_new_tokens=3), Sampling(max_new_tokens=5, temperature=1.2, seed=1)]
    decoder = StaticDecoder(model, batch=2, capacity=8)  # too small: `run` makes room
    big = StaticDecoder(model, batch=2, capacity=16)
    alone = [big.generate(p[None], s)[0] for p, s in zip(prompts, samplings)]
    # a left-padded batch through `generate`
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = prompts[0], 1
    ids[1, 5:], mask[1, 5:] = prompts[1], 1
    assert big.generate(ids, samplings[:2], attention_mask=mask) == alone[:2]
    # continuous batching: the third request joins when the second ends, in its place
    rows = [Row(p.tolist(), s) for p, s in zip(prompts, samplings)]
    waiting, steps = list(rows), []

    def admit(live: int) -> list:
        taken = waiting[:2 - live]
        del waiting[:len(taken)]
        return taken

    def on_step(live, tokens):
        steps.append([r is not None and r is rows[2] for r in live])
        return []

    decoder.run(admit, on_step)
    assert [r.out for r in rows] == alone
    assert decoder.capacity == 256  # grown to what the first rows needed, rounded up
    assert any(place[1] for place in steps) and not any(place[0] for place in steps)
