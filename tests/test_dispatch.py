"""`nf4tune.dispatch`: the one place that chooses between the PyTorch reference and the fast kernels.

The layering rules are checked on the source (quant/ imports no kernel, only dispatch reads the
switches or asks the kernels what they take, only kernels/cpu.py touches ctypes); each path is
checked to be the one `path()` names and to give the reference's bytes; `nf4tune doctor` reports it."""

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.cli.main import main
from nf4tune.kernels import base, compiled
from nf4tune.kernels import cpu as native
from nf4tune.kernels import cuda as cuda_kernels
from nf4tune.quant import QuantLayout, blockwise, ops

SRC = Path(dispatch.__file__).parent
DISPATCH = SRC / "dispatch.py"


def _sources():
    return {p: p.read_text() for p in SRC.rglob("*.py")}


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
            found.update("." * node.level + (node.module + "." if node.module else "") + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_quant_is_the_pure_reference_and_kernels_sit_below_dispatch():
    for path, source in _sources().items():
        imports = _imports(source)
        if path.parent.name == "quant":
            assert not [i for i in imports if re.search(r"kernels|dispatch|compiled|layers|serve", i)], path
        if path.parent.name == "kernels":
            assert not [i for i in imports if re.search(r"dispatch|layers|serve|train|models", i)], path


def test_only_dispatch_reads_the_switches_and_asks_the_kernels_what_they_take():
    checks = re.compile(r"NF4TUNE_NATIVE|NF4TUNE_COMPILE|_rejects\(|has_bf16_matmul\(|cuda_kernels\.check\(|"
                        r"native\.load\(|\.usable\(|\.supports\(")
    offenders = [str(p.relative_to(SRC)) for p, s in _sources().items()
                 if p != DISPATCH and p.parent.name != "kernels" and checks.search(s)]
    assert offenders == []
    # and within kernels/, the switches are not read either: dispatch decides
    assert not [p for p, s in _sources().items() if p.parent.name == "kernels" and "os.environ.get(\"NF4TUNE_NATIVE" in s]
    ctypes_users = [p.name for p, s in _sources().items() if "ctypes" in _imports(s)]
    assert ctypes_users == ["cpu.py"]


def test_cpu_and_cuda_fused_matmuls_share_one_call():
    for cls in (native.Matmul4bit, cuda_kernels.Matmul4bit):
        assert issubclass(cls, base.Matmul4bit)
        assert inspect.signature(cls.__call__) == inspect.signature(base.Matmul4bit.__call__)


def _clear():
    dispatch.native_library.cache_clear()


@pytest.fixture
def switches(monkeypatch):
    """Set NF4TUNE_NATIVE / NF4TUNE_COMPILE for one test, the cached library forgotten before and after."""
    def set_(native_on: bool, compile_on: bool, min_numel: int = 0):
        monkeypatch.setenv("NF4TUNE_NATIVE", "1" if native_on else "0")
        monkeypatch.setenv("NF4TUNE_COMPILE", "1" if compile_on else "0")
        monkeypatch.setattr(dispatch, "COMPILE_MIN_NUMEL", min_numel)
        monkeypatch.setattr(compiled, "broken", False)
        _clear()
    yield set_
    _clear()


@pytest.mark.parametrize("native_on, compile_on", [(True, False), (False, True), (False, False)],
                         ids=["native", "compiled", "reference"])
def test_each_path_is_the_one_named_and_gives_the_reference_bytes(switches, native_on, compile_on):
    switches(native_on, compile_on)
    have_native = dispatch.native_library()[0] is not None
    if native_on and not have_native:
        pytest.skip("no AVX-512 kernels here")
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 200, generator=gen).to(torch.bfloat16)  # 8000 values: a partial last block of 64
    q = nf4tune.quantize(w)
    expected = dispatch.NATIVE if native_on else dispatch.COMPILED if compile_on else dispatch.REFERENCE
    chosen = dispatch.path("dequantize_4bit", q)
    assert chosen.name == expected
    if not native_on:
        assert "NF4TUNE_NATIVE=0" in chosen.reason
    if not compile_on and not native_on:
        assert "NF4TUNE_COMPILE=0" in chosen.reason
    absmax = q.float_absmax()
    for dtype in (torch.bfloat16,) if expected == dispatch.COMPILED else (torch.bfloat16, torch.float32):  # compiling is slow
        ref = blockwise.dequantize_4bit(q.packed, absmax, q.shape, "nf4", 64, dtype)
        assert torch.equal(q.dequantize(dtype), ref)  # what the package's public API runs
    assert not compiled.broken
    plain = nf4tune.quantize(w, double_quant=False)
    packed, amax = blockwise.quantize_4bit(w, "nf4", 64)
    assert torch.equal(plain.packed, packed) and torch.equal(plain.absmax, amax) and torch.equal(q.packed, packed)
    assert (dispatch.path("quantize_4bit", w, "nf4", 64).name == dispatch.COMPILED) == compile_on


def test_fused_matmul_exists_exactly_where_the_path_says(switches):
    q = nf4tune.quantize(torch.randn(64, 128))
    switches(False, True)
    assert dispatch.fused_matmul_4bit(q) is None and not dispatch.path("matmul_4bit", q).fast
    layer = nf4tune.Linear4bit.from_quantized(q, compute_dtype=torch.float32)
    x = torch.randn(2, 128)
    with torch.no_grad():
        reference = layer(x)
    assert layer._decode_plan is None
    switches(True, True)
    if dispatch.native_library()[0] is None:
        return
    assert isinstance(dispatch.fused_matmul_4bit(q), dispatch.Matmul4bit)
    with torch.no_grad():
        fused = layer(x)
    assert isinstance(layer._decode_plan, native.Matmul4bit)
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-5)
    # a weight the kernel cannot take (rows not whole blocks) is named as such
    odd = nf4tune.quantize(torch.randn(8, 96), blocksize=64)
    assert dispatch.path("matmul_4bit", odd).reason == "its rows are not whole blocks"
    assert torch.allclose(dispatch.matmul_4bit(x[:, :96], odd), x[:, :96] @ odd.dequantize(torch.float32).t())


def test_small_inputs_and_other_devices_stay_on_the_reference():
    small = torch.zeros(10)
    assert "below" in dispatch.path("loss", small).reason
    meta = nf4tune.QuantizedTensor(torch.zeros(32, 1, dtype=torch.uint8, device="meta"), torch.zeros(1, device="meta"),
                                   QuantLayout(torch.Size((8, 8)), torch.float32, "nf4", 64))
    assert dispatch.path("matmul_4bit", meta).name == dispatch.REFERENCE
    with pytest.raises(ValueError, match="unknown operation"):
        dispatch.path("softmax", small)


def test_rms_norm_kernel_and_reference_agree(switches):
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(3, 256, generator=gen), torch.rand(256, generator=gen) + 0.5
    switches(False, False)
    reference = dispatch.rms_norm(x, weight, 1e-6)
    oracle = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double())
    assert reference.dtype == torch.bfloat16
    assert (reference.double() - oracle).abs().max() <= 8e-3 * oracle.abs().max()
    switches(True, False)
    if dispatch.native_library()[0] is None:
        return
    out = torch.empty(3, 256, dtype=torch.bfloat16)
    assert dispatch.rms_norm(x, weight, 1e-6, out=out) is out
    assert (out.double() - reference.double()).abs().max() <= 8e-3 * oracle.abs().max()


def test_doctor_prints_each_op_and_why(switches, capsys):
    switches(False, True, min_numel=dispatch.COMPILE_MIN_NUMEL)
    assert main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    cpu = {p["op"]: p for p in found["paths"] if p["device"] == "cpu"}
    assert set(cpu) == set(dispatch.OPS)
    assert cpu["matmul_4bit"]["path"] == "reference" and "NF4TUNE_NATIVE=0" in cpu["matmul_4bit"]["reason"]
    assert cpu["dequantize_4bit"]["path"] == "torch.compile"  # a 7B-class layer is big enough to compile
    assert found["environment"]["NF4TUNE_NATIVE"] == "0"
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert all(re.search(rf"^  {op} +\S+ +\S", text, re.M) for op in dispatch.OPS), text


@pytest.mark.parametrize("double_quant", [False, True])
def test_compiling_traces_through_the_4bit_lora_layer_with_the_eager_results(double_quant):
    """`torch.compile(fullgraph=True)` fails on any graph break: the layer must be one custom op to it.
    aot_eager traces forward and backward as Inductor does, without its slow C++ code generation."""
    gen = torch.Generator().manual_seed(7)
    q = nf4tune.quantize(torch.randn(96, 128, generator=gen), double_quant=double_quant)
    layer = nf4tune.Linear4bit.from_quantized(q, bias=torch.randn(96, generator=gen), compute_dtype=torch.float32)
    layer.add_lora(r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x = torch.randn(2, 5, 128, generator=gen, requires_grad=True)

    def block(x):  # a layer's small ops around the 4-bit linear, as in a decoder layer
        return torch.nn.functional.silu(layer(x * 0.5)).square().mean()

    torch._dynamo.reset()
    compiled_block = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager, compiled = block(x), compiled_block(x)
    params = [x, layer.lora_A, layer.lora_B]
    for a, b in zip(torch.autograd.grad(eager, params), torch.autograd.grad(compiled, params)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert torch.allclose(eager, compiled, rtol=1e-6)
    args = (x.detach().requires_grad_(), x.detach(), layer.lora_A, layer.lora_B, 2.0, layer.bias, None,
            *layer.weight_args())
    torch.library.opcheck(ops.lora_linear_4bit, args)  # fake and autograd registrations agree with the op


def test_training_dequantizes_into_one_reused_buffer_with_the_same_bytes():
    gen = torch.Generator().manual_seed(8)
    big, small = (nf4tune.quantize(torch.randn(s, generator=gen)) for s in ((64, 256), (32, 192)))
    first = dispatch.dequantize_scratch(big, torch.bfloat16)
    assert torch.equal(first, big.dequantize(torch.bfloat16))
    second = dispatch.dequantize_scratch(small, torch.bfloat16)
    assert torch.equal(second, small.dequantize(torch.bfloat16))
    if dispatch.path("dequantize_4bit", small).name in (dispatch.NATIVE, dispatch.TRITON):
        assert second.data_ptr() == first.data_ptr()  # written where the first weight was: no new allocation
    layer = nf4tune.Linear4bit.from_quantized(big, compute_dtype=torch.bfloat16)
    layer.add_lora(r=4, alpha=8)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16).requires_grad_()
    layer(x).float().square().sum().backward()
    w = big.dequantize(torch.float32)
    expected = (2 * (x.float() @ w.t()) @ w)  # B is zero: the base path alone
    assert (x.grad.float() - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_no_module_assigns_into_another_modules_globals():
    """Fast paths are chosen through PyTorch's dispatcher: no module rebinds a name in another of the package's."""
    offenders = []
    for path, source in _sources().items():
        tree = ast.parse(source)
        imported = {a.asname or a.name.split(".")[0] for node in ast.walk(tree) for a in getattr(node, "names", ())
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nf4tune"))
                    or isinstance(node, ast.Import) and a.name.startswith("nf4tune")}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            offenders += [f"{path.name}:{node.lineno}" for t in targets
                          if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in imported]
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and isinstance(
                    node.args[0], ast.Name) and node.args[0].id in imported:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    # nor offers a setter of its globals for others to call: the one `global` is compiled.run's own failure flag
    rebinding = [p.name for p, s in _sources().items() if re.search(r"^\s+global ", s, re.M)]
    assert rebinding == ["compiled.py"]


_ORDERS = [("nf4tune.quant", "nf4tune.layers", "nf4tune.dispatch"),
           ("nf4tune.dispatch", "nf4tune.quant"),
           ("nf4tune.train.compile", "nf4tune.serve.engine", "nf4tune.layers"),
           ("nf4tune.quant.ops", "nf4tune.models", "nf4tune.dispatch")]
_PROBE = """
import importlib, json, sys, torch
for name in sys.argv[1:]:
    importlib.import_module(name)
from nf4tune import dispatch
kernels = {op: [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"nf4tune::{op}", key)]
           for op in ("quantize_4bit", "dequantize_4bit", "matmul_4bit", "lora_linear_4bit", "grad_input_4bit")}
print(json.dumps({"paths": dispatch.report()["paths"], "kernels": kernels}))
"""


def test_importing_modules_in_any_order_gives_the_same_paths_and_kernels():
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(SRC.parent))
    runs = [subprocess.Popen([sys.executable, "-c", _PROBE, *order], stdout=subprocess.PIPE, text=True, env=env)
            for order in _ORDERS]
    answers = [json.loads(run.communicate(timeout=300)[0]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert all(answer == answers[0] for answer in answers[1:])
    assert answers[0]["kernels"]["dequantize_4bit"] == ["CPU", "CUDA"]  # dispatch's, whatever came first
    assert {p["op"] for p in answers[0]["paths"]} == set(dispatch.OPS)


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_custom_ops_pass_opcheck_and_match_the_reference(double_quant):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 128, generator=gen)
    q = nf4tune.quantize(w, double_quant=double_quant)
    layer = nf4tune.Linear4bit.from_quantized(q, compute_dtype=torch.float32)
    weight = layer.weight_args()
    x = torch.randn(3, 128, generator=gen)
    absmax = q.float_absmax()
    calls = {
        ops.quantize_4bit: (w, "nf4", 64),
        ops.dequantize_4bit: (q.packed, absmax, list(q.shape), "nf4", 64, torch.bfloat16),
        ops.matmul_4bit: (x, q.packed, q.absmax, q.nested_absmax, float(q.offset or 0.0), list(q.shape), "nf4", 64,
                          q.nested_blocksize),
        ops.grad_input_4bit: (torch.randn(3, 24, generator=gen), *weight),
    }
    for op, args in calls.items():
        torch.library.opcheck(op, args)
    expected = x.double() @ blockwise.dequantize_4bit(q.packed, absmax, q.shape, "nf4", 64, torch.float32).double().t()
    assert torch.allclose(ops.matmul_4bit(*calls[ops.matmul_4bit]).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.dequantize_4bit(*calls[ops.dequantize_4bit]),
                       blockwise.dequantize_4bit(q.packed, absmax, q.shape, "nf4", 64, torch.bfloat16))
    # a 16-bit base (quant_type "none") and a kept output take the same op and gradient
    dense = nf4tune.Linear16bit(128, 24, compute_dtype=torch.float32)
    dense.set_weight(w)
    dense.add_lora(r=2, alpha=4)
    xg = x.clone().requires_grad_()
    for kept in (None, x @ w.t()):
        torch.library.opcheck(ops.lora_linear_4bit, (xg, x, dense.lora_A, dense.lora_B, 2.0, None, kept,
                                                     *dense.weight_args()))


def test_the_paths_answer_the_layers_choices(monkeypatch):
    q = nf4tune.quantize(torch.randn(64, 128))
    few, many = torch.zeros(dispatch.FUSED_MAX_TOKENS, 128), torch.zeros(dispatch.FUSED_MAX_TOKENS + 1, 128)
    assert dispatch.fuses(few, 128) and not dispatch.fuses(many, 128)
    assert dispatch.path("matmul_4bit", q, many).reason.startswith(f"{dispatch.FUSED_MAX_TOKENS + 1} tokens")
    assert dispatch.path("matmul_4bit", q, few) == dispatch.path("matmul_4bit", q)
    from nf4tune.train.compile import compile_wanted

    for device in (torch.device("cpu"), torch.device("cuda")):
        assert compile_wanted("auto", device) == dispatch.path("train_compile", device).fast == (device.type == "cuda")
    monkeypatch.setenv(dispatch.COMPILE_ENV, "0")
    assert not compile_wanted("auto", torch.device("cuda")) and compile_wanted(True, torch.device("cpu"))
    monkeypatch.setenv(dispatch.COMPILE_ENV, "1")
    monkeypatch.setenv(dispatch.STATIC_DECODER_ENV, "compiled")
    chosen = dispatch.path("decode", torch.zeros(1))
    assert (chosen.name, chosen.static_mode) == ("static-compiled", "compiled")
    monkeypatch.setenv(dispatch.STATIC_DECODER_ENV, "0")
    assert dispatch.path("decode", torch.zeros(1)).static_mode is None
