"""The frozen weights' training products in float32 for bfloat16 activations (where the CPU's float32 GEMM
is the faster): the 4-bit layers' forward and input gradient, and the chunked loss's head, each against
a float64 reference, and no less accurate than the bfloat16 products they replace."""

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.errors import Nf4tuneError
from nf4tune.kernels import gemm
from nf4tune.models import loss


@pytest.fixture(params=["bfloat16", "float32"])
def train_matmul(request, monkeypatch):
    """Each test runs with the bf16 products in bfloat16 and in float32, whatever the probe says here."""
    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, request.param)
    return getattr(torch, request.param)


def test_the_choice_follows_the_setting_and_only_touches_bfloat16_cpu_tensors(monkeypatch):
    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, "float32")
    assert dispatch.training_matmul_dtype(x) == torch.float32
    assert dispatch.training_matmul_dtype(x.float()) == torch.float32
    assert dispatch.training_matmul_dtype(x.half()) == torch.float16
    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, "bfloat16")
    assert dispatch.training_matmul_dtype(x) == torch.bfloat16
    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, "auto")
    expected = torch.float32 if gemm.float32_gemm_faster() else torch.bfloat16
    assert dispatch.training_matmul_dtype(x) == expected
    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, "fp8")
    with pytest.raises(Nf4tuneError, match="NF4TUNE_TRAIN_MATMUL='fp8'"):
        dispatch.training_matmul_dtype(x)


def _error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max())


def test_4bit_layer_forward_and_gradients_match_a_float64_reference(train_matmul, monkeypatch):
    monkeypatch.setattr(gemm, "ROWS", 32)  # 120 rows: four blocks, the last a short one
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.05
    layer = nf4tune.Linear4bit.from_quantized(nf4tune.quantize(w), bias=torch.randn(96), compute_dtype=torch.bfloat16)
    layer.add_lora(r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 40, 160).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(3, 40, 96).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * upstream.float()).sum().backward()

    w64 = layer.quantized_weight.dequantize(torch.float64)
    x64 = x.detach().double().requires_grad_()
    # the adapters enter the products rounded to bf16, as PEFT's under bf16 autocast
    a64 = layer.lora_A.detach().to(torch.bfloat16).double().requires_grad_()
    b64 = layer.lora_B.detach().to(torch.bfloat16).double().requires_grad_()
    y64 = x64 @ w64.t() + layer.bias.double() + (x64 @ a64.t() @ b64.t()) * layer.scaling
    (y64 * upstream.double()).sum().backward()
    # bf16 outputs: 2^-8 relative rounding, a few roundings deep
    assert _error(y, y64) < 0.02
    for ours, ref in [(x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)]:
        assert _error(ours, ref) < 0.02


def test_the_float32_products_are_no_less_accurate_than_bfloat16_ones(monkeypatch):
    torch.manual_seed(1)
    layer = nf4tune.Linear4bit.from_quantized(nf4tune.quantize(torch.randn(256, 512) * 0.05))
    x = torch.randn(64, 512).to(torch.bfloat16)
    ref = x.double() @ layer.quantized_weight.dequantize(torch.float64).t()
    errors = {}
    for setting in ("bfloat16", "float32"):
        monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, setting)
        xs = x.clone().requires_grad_()
        y = layer(xs)
        y.backward(torch.ones_like(y))
        errors[setting] = (_error(y, ref), xs.grad.clone())
    assert errors["float32"][0] <= errors["bfloat16"][0] * 1.01 + 1e-6
    grad_ref = layer.quantized_weight.dequantize(torch.float64).sum(0).expand(64, -1)
    assert _error(errors["float32"][1], grad_ref) <= _error(errors["bfloat16"][1], grad_ref) * 1.01 + 1e-6


@pytest.mark.parametrize("vocab", [50, 67])  # one slice, and several with a short last one
def test_chunked_loss_in_slices_matches_a_float64_reference(train_matmul, monkeypatch, vocab):
    monkeypatch.setattr(loss, "VOCAB_SLICE", 16)
    torch.manual_seed(2)
    head = torch.nn.Linear(32, vocab, bias=True).to(torch.bfloat16)
    hidden = torch.randn(21, 32).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (21,))
    total = loss.chunked_loss_sum(hidden, head, targets, chunk_tokens=8)
    total.backward()

    h64 = hidden.detach().double().requires_grad_()
    logits = h64 @ head.weight.double().t() + head.bias.double()
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    ref.backward()
    assert abs(total.item() - ref.item()) <= 0.01 * ref.item()
    assert _error(hidden.grad, h64.grad) < 0.02


def test_head_products_in_float32_round_as_the_bfloat16_gemm(monkeypatch):
    """The sliced float32 logits and input gradient are the bf16 GEMM's up to its own summation order."""
    monkeypatch.setattr(loss, "VOCAB_SLICE", 64)
    torch.manual_seed(3)
    h = torch.randn(40, 96).to(torch.bfloat16)
    w = torch.randn(200, 96).to(torch.bfloat16)
    g = torch.randn(40, 200).to(torch.bfloat16)
    monkeypatch.setenv(dispatch.TRAIN_MATMUL_ENV, "float32")
    logits, grad = loss._head_logits(h, w, None), loss._grad_head_input(g, w)
    assert logits.dtype == grad.dtype == torch.bfloat16
    exact_logits, exact_grad = (h.double() @ w.double().t()), (g.double() @ w.double())
    # rounded once from float32 sums: within half a bf16 unit (2^-9 relative) of the exact product, plus summation
    assert ((logits.double() - exact_logits).abs() <= exact_logits.abs() * 2**-8 + 1e-3).all()
    assert ((grad.double() - exact_grad).abs() <= exact_grad.abs() * 2**-8 + 1e-3).all()


def test_the_compiled_loss_kernels_compile_once_for_one_and_for_several_chunks():
    """A first sequence of one loss chunk, then one of several: the kernels compiled for the first serve the
    second (their guards once tied the chunk's targets' base size to the logits' rows, and every run
    compiled again at its first long sequence)."""
    if not dispatch.path("loss", torch.zeros(2048, 32000)).fast:
        pytest.skip("the loss kernels are not compiled here")
    from torch._dynamo.utils import counters

    vocab = 2 * dispatch.COMPILE_MIN_NUMEL // 96 + 1  # compiled from the first, smaller chunk on
    head = torch.nn.Linear(64, vocab, bias=False).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    frames = []
    for tokens in (96, 250):  # one chunk of 128 tokens, then two chunks
        hidden = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, vocab, (tokens,), generator=gen)
        loss.chunked_loss_sum(hidden, head, targets, chunk_tokens=128).backward()
        frames.append(counters["frames"]["ok"])
    assert frames[1] == frames[0] > 0, frames
