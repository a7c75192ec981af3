"""The hand-written kernels (AVX-512 on CPU, Triton on CUDA) against the PyTorch reference:
bit-exact dequantization, matmuls within float32 rounding of a float64 product, and the 4-bit
layer's inference path against its training path."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.kernels import cpu as native
from nf4tune.quant import blockwise
from nf4tune.quant.codes import code_4bit

needs_kernels = pytest.mark.skipif(dispatch.native_library()[0] is None,
                                   reason="the native kernels need an x86-64 CPU with AVX-512 and a C++ compiler")


@needs_kernels
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_dequantize_is_bit_exact_with_the_reference(quant_type, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    for shape in [(96, 256), (7, 100)]:  # the second ends in a partial block
        w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        w.view(-1)[:blocksize] = 0  # an all-zero block
        q = nf4tune.quantize(w, quant_type=quant_type, blocksize=blocksize)
        absmax = q.float_absmax()
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            ref = blockwise.dequantize_4bit(q.packed, absmax, q.shape, quant_type, blocksize, dtype)
            got = q.dequantize(dtype)  # takes the native path where it can
            assert got.dtype == dtype and torch.equal(got, ref), (shape, dtype)
            n = w.numel() - w.numel() % blocksize
            direct = native.dequantize_4bit(q.packed.view(-1), absmax, code_4bit(quant_type), w.numel(), blocksize, dtype)
            assert torch.equal(direct, ref.view(-1)[:n])


@needs_kernels
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, blocksize", [((200, 512), 64), ((100, 192), 64), ((40, 512), 32), ((24, 768), 256),
                                              ((30, 160), 32)])
def test_matmul_matches_a_float64_product(quant_type, double_quant, shape, blocksize):
    # the kernel's 128-weight steps take one scale per 8 weights: blocks of 32 give a step four scales, of 256
    # one; 192 and 160 leave 64 and 32 weights after the last step (taken 32 at a time); 100 x 192 has rows
    # whose three blocks straddle two groups of 256 double-quantized absmax codes
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    q = nf4tune.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    weight = q.dequantize(torch.float32).double()
    for rows in (1, 3, 8, 11):  # one pass of the 8-row kernel, two passes, and partial ones
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
            x = torch.randn(rows, shape[1], generator=gen).to(dtype)
            got = native.matmul_4bit(x, q)
            ref = x.double() @ weight.t()
            assert got.dtype == dtype and got.shape == (rows, shape[0])
            assert (got.double() - ref).abs().max() <= tol * ref.abs().max(), (rows, dtype)
            # each row alone as in the batch (4-row tiles: 11 rows are three tiles, one partial)
            assert all(torch.equal(native.matmul_4bit(x[i:i + 1], q)[0], got[i]) for i in range(rows))
    with pytest.raises(ValueError, match="the weight takes"):
        native.matmul_4bit(torch.ones(2, shape[1] // 2), q)


@needs_kernels
@pytest.mark.parametrize("k", [4, 20, 64, 1024])  # below, across and at multiples of 16 (the vector width)
def test_float32_matmul_matches_float64_and_is_the_same_for_any_batch(k):
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(5, k, generator=gen), torch.randn(300, k, generator=gen)
    got = native.matmul_f32(x, w)
    ref = x.double() @ w.double().t()
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert all(torch.equal(native.matmul_f32(x[i:i + 1], w)[0], got[i]) for i in range(5))


@needs_kernels
def test_the_layer_decodes_through_the_fused_kernel_with_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q = nf4tune.quantize(torch.randn(96, 128, generator=gen))
    layer = nf4tune.Linear4bit.from_quantized(q, bias=torch.randn(96, generator=gen), compute_dtype=torch.float32)
    layer.add_lora(r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x = torch.randn(2, 3, 128, generator=gen)
    training_path = layer(x)  # with grad enabled: dequantize and multiply

    calls = []
    real = native.Matmul4bit.__call__
    monkeypatch.setattr(native.Matmul4bit, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused = layer(x)
        assert len(calls) == 1 and fused.shape == training_path.shape
        assert torch.allclose(fused, training_path, rtol=1e-5, atol=1e-5)
        layer(torch.randn(dispatch.FUSED_MAX_TOKENS + 1, 128))  # more tokens: back to dequantize + matmul
        assert len(calls) == 1
        layer.lora_B.mul_(-2)  # an in-place update, as an optimizer step: the kept adapter copy follows
        moved = layer(x)
    with torch.enable_grad():
        assert torch.allclose(moved, layer(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("NF4TUNE_CACHE", str(tmp_path))
    target = native.library_path(native._compiler(), native._cpu_flags())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a library")  # as a full disk or a killed copy might leave it
    native.load.cache_clear()
    try:
        assert native.load()[0] is not None and target.stat().st_size > 1000
    finally:
        native.load.cache_clear()


def test_without_a_compiler_the_kernels_step_aside_with_a_warning(monkeypatch, tmp_path, caplog):
    if dispatch.native_library()[0] is None:
        pytest.skip("no native kernels on this machine to begin with")
    monkeypatch.setenv("NF4TUNE_CACHE", str(tmp_path))  # nothing cached: a build is needed
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    dispatch.native_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert dispatch.native_library()[0] is None
            assert "could not build" in dispatch.path("matmul_4bit", nf4tune.quantize(torch.randn(8, 64))).reason
        assert "could not build the AVX-512 kernels" in caplog.text
        layer = nf4tune.Linear4bit.from_quantized(nf4tune.quantize(torch.randn(32, 64)), compute_dtype=torch.float32)
        with torch.no_grad():  # the layer still works, on the PyTorch path
            assert layer(torch.ones(1, 64)).shape == (1, 32)
    finally:
        native.load.cache_clear()
        dispatch.native_library.cache_clear()


@needs_kernels
def test_the_output_head_decodes_through_the_bf16_kernel(monkeypatch):
    from nf4tune.layers.head import OutputHead

    if not dispatch.path("head_matmul", torch.ones(1, 128, dtype=torch.bfloat16), torch.ones(8, 128, dtype=torch.bfloat16)).fast:
        pytest.skip("this CPU lacks AVX512-BF16")
    gen = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(128, 300, bias=False).to(torch.bfloat16)
    head = OutputHead.wrap(linear)
    assert head.weight is linear.weight  # shared, so tied embeddings stay tied
    hidden = torch.randn(2, 7, 128, generator=gen).to(torch.bfloat16)
    last = hidden[:, -1:, :]  # what transformers passes when it keeps only the last logits
    calls = []
    real = native.matmul_bf16
    monkeypatch.setattr(native, "matmul_bf16", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ref = last.double() @ linear.weight.double().t()
        got = head(last)
        assert calls and got.shape == (2, 1, 300)
        assert (got.double() - ref).abs().max() <= 8e-3 * ref.abs().max()
        assert torch.equal(head(hidden), linear(hidden))  # many tokens: the plain product
    assert len(calls) == 1


@needs_kernels
@pytest.mark.parametrize("k", [96, 512])  # 96: a multiple of 32, not of 64
def test_the_bf16_head_kernel_is_exact_and_batch_invariant(k):
    """Every batch of 1 to 8 rows, a vocabulary that is not a multiple of the kernel's row groups: within
    float32 summation of a float64 product, and each row bit for bit what it gets alone."""
    if not native.has_bf16_matmul():
        pytest.skip("this CPU lacks AVX512-BF16")
    gen = torch.Generator().manual_seed(k)
    weight = (torch.randn(1003, k, generator=gen) * 0.05).to(torch.bfloat16)
    x = torch.randn(8, k, generator=gen).to(torch.bfloat16)
    alone = [native.matmul_bf16(x[i:i + 1], weight) for i in range(8)]
    for rows in range(1, 9):
        got = native.matmul_bf16(x[:rows], weight)
        ref = x[:rows].double() @ weight.double().t()
        assert (got.double() - ref).abs().max() <= 8e-3 * ref.abs().max(), rows
        for i in range(rows):
            assert torch.equal(got[i:i + 1], alone[i]), (rows, i)


@needs_kernels
@pytest.mark.parametrize("vocab", [32000, 49152, 100, 7])  # 7 and 100: rows that end off the kernel's 16 lanes
def test_argmax_kernel_picks_as_torch_does(vocab):
    """The greedy token: ties (the first maximum), a NaN (its first), +inf, a row of -inf but one."""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=gen)
    x[1, ::3] = x[1].max() + 1  # ties: the first wins
    x[2, vocab // 2], x[2, vocab - 1] = float("nan"), float("nan")
    x[3, vocab - 1] = float("inf")
    x[4] = float("-inf")
    x[4, vocab - 1] = -1e30
    x[5, -1] = float("nan")
    assert dispatch.path("argmax", x[0]).fast
    assert torch.equal(dispatch.argmax(x), x.argmax(-1))
    assert [int(dispatch.argmax(row)) for row in x] == x.argmax(-1).tolist()
    assert not dispatch.path("argmax", x.to(torch.bfloat16)).fast  # float32 scores only; others go to torch
    assert torch.equal(dispatch.argmax(x.to(torch.bfloat16)), x.to(torch.bfloat16).argmax(-1))


_TRITON_CHECK = '''
import torch, nf4tune
from nf4tune.kernels import cuda as kernels
from nf4tune.quant import blockwise
from nf4tune.quant.codes import code_4bit
gen = torch.Generator().manual_seed(0)
for quant_type in ("nf4", "fp4"):
    for shape, blocksize in (((40, 192), 64), ((7, 100), 64), ((16, 256), 128)):
        w = torch.randn(shape, generator=gen).to(torch.bfloat16)
        q = nf4tune.quantize(w, quant_type=quant_type, blocksize=blocksize)
        absmax = q.float_absmax()
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            ref = blockwise.dequantize_4bit(q.packed, absmax, q.shape, quant_type, blocksize, dtype)
            got = kernels.dequantize_4bit(q.packed, absmax, code_4bit(quant_type), w.numel(), blocksize, dtype)
            assert torch.equal(got.view(shape), ref), (quant_type, shape, dtype)
        for double_quant in (False, True):
            q = nf4tune.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
            weight = q.dequantize(torch.float32).double()
            for rows in (1, 3):
                for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
                    x = torch.randn(rows, shape[1], generator=gen).to(dtype)
                    got = kernels.Matmul4bit(q)(x)
                    ref = x.double() @ weight.t()
                    assert got.dtype == dtype and got.shape == (rows, shape[0])
                    assert (got.double() - ref).abs().max() <= tol * ref.abs().max(), (quant_type, shape, rows, dtype)
kernels.self_check(torch.device("cpu"))  # the check a GPU runs on first use passes where the kernels are right
real = kernels.dequantize_4bit
kernels.dequantize_4bit = lambda *args: real(*args) * 0.5  # and catches a kernel that is wrong
try:
    kernels.self_check(torch.device("cpu"))
    raise SystemExit("self_check passed a wrong kernel")
except RuntimeError:
    pass
print("ok")
'''


def test_triton_kernels_match_the_reference_in_the_interpreter():
    """The CUDA kernels' arithmetic, run on CPU by Triton's interpreter: bit-exact dequantization in
    every dtype, matmuls within float32 rounding of a float64 product, for NF4 and FP4, with and
    without double quantization, ragged shapes included."""
    pytest.importorskip("triton", reason="Triton (which ships with CUDA builds of torch) is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_serve_the_layer_on_cuda():
    from nf4tune.kernels import cuda as kernels

    assert kernels.check(torch.device("cuda")) is None, "the first-use check against the reference failed on this GPU"
    gen = torch.Generator().manual_seed(6)
    q = nf4tune.quantize(torch.randn(256, 512, generator=gen).cuda())
    layer = nf4tune.Linear4bit.from_quantized(q, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 512, generator=gen).to("cuda", torch.bfloat16)
    with torch.no_grad():
        fused = layer(x)
        assert isinstance(layer._decode_plan, kernels.Matmul4bit)
    reference = x.double() @ q.dequantize(torch.float32).double().t()
    assert (fused.double() - reference).abs().max() <= 8e-3 * reference.abs().max()


ENGINE_RELEASES_THE_TEAM = """
import os, sys, threading, torch
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.models.load import load_model
from nf4tune.serve.engine import Engine
from nf4tune.serve.request import Request
from nf4tune.serve.sampling import Sampling

def tasks():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(3)  # a team of three whatever the cores
build_tiny_checkpoint(sys.argv[1], "llama")
model, tokenizer = load_model(sys.argv[1], device="cpu", progress=False)
torch.ones(1 << 22).sum()  # a parallel region on this thread: its team of three
loaded = tasks()
engine = Engine(model, tokenizer)  # its worker thread comes; this thread's two team threads go
made = tasks()
print(loaded, made, (engine.submit(Request("ab", sampling=Sampling(4, 0.0))).wait().completion_tokens))
engine.close()
"""


@pytest.mark.skipif(native._openmp_runtime() is None or not os.path.isdir("/proc/self/task"),
                    reason="no libgomp found in /proc/self/maps (PyTorch built with another OpenMP runtime)")
def test_an_engine_lets_the_openmp_team_of_the_thread_that_loaded_go(tmp_path):
    """Two OpenMP teams on a CPU of few cores slowed the engine's worker 2.5x (chat's replies); the thread that
    made the engine keeps none (the worker makes its own when it decodes)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", ENGINE_RELEASES_THE_TEAM, str(tmp_path / "model")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, made, replied = (int(n) for n in out.stdout.split())
    assert made == loaded - 2 + 1  # two team threads gone, the worker come
    assert replied == 4  # and it decodes
