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
