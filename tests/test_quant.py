"""The 4-bit core against bitsandbytes (the oracle) and a float64 reference."""

import json

import pytest
import torch

import nf4tune
from nf4tune import dispatch
from nf4tune.kernels import compiled
from nf4tune.quant import blockwise
from nf4tune.quant.codes import dynamic_code, fp4_code, nf4_code

bnb_F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for these tests")

# The 16 NF4 values as published in the QLoRA paper's code (bitsandbytes' table).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_derivation_gives_the_published_values():
    assert nf4_code().tolist() == torch.tensor(PUBLISHED_NF4, dtype=torch.float32).tolist()
    assert torch.equal(nf4_code(), bnb_F.get_4bit_type("nf4", device="cpu"))
    # The properties the construction promises: exact zero, [-1, 1], more positive than negative levels.
    assert (nf4_code() == 0).sum() == 1 and nf4_code().min() == -1 and nf4_code().max() == 1
    assert (nf4_code() > 0).sum() == 8 and (nf4_code() < 0).sum() == 7


def test_fp4_and_dynamic_tables_match_bitsandbytes():
    bnb_fp4 = bnb_F.get_4bit_type("fp4", device="cpu")
    assert torch.equal(fp4_code().view(torch.int32), bnb_fp4.view(torch.int32))  # signed zeros too
    assert torch.equal(dynamic_code(), bnb_F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_code(signed=False), bnb_F.create_dynamic_map(signed=False))


def _bnb_avx512_dequant_is_wrong(shape, blocksize):
    # bitsandbytes' AVX-512 CPU dequantize kernel looks absmax up per row, which is wrong when a row
    # is a multiple of 16 elements but not of the block size. Its own quantizer and its scalar and
    # generic paths agree with us; there we compare against a float64 reference instead.
    last = shape[-1] if len(shape) > 1 else shape[0]
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and last % 16 == 0 and last % blocksize != 0


def _float64_dequant(q: nf4tune.QuantizedTensor, dtype):
    codes = blockwise.unpack_4bit(q.packed, q.numel).long()
    table = nf4tune.quant.code_4bit(q.quant_type).double()
    scale = q.float_absmax().double().repeat_interleave(q.blocksize)[: q.numel]
    return (table[codes] * scale).to(dtype).view(q.shape)


SHAPES = [(256, 64), (96, 200), (33, 17), (1, 7), (5,), (3, 4097), (130, 130)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bit_exact_with_bitsandbytes(quant_type, dtype, blocksize, double_quant):
    gen = torch.Generator().manual_seed(blocksize + len(quant_type))
    for shape in SHAPES:
        w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        w.view(-1)[: min(w.numel(), blocksize)] = 0  # an all-zero block
        ref_packed, ref_state = bnb_F.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        q = nf4tune.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)

        key = "model.layers.0.mlp.up_proj.weight"
        ours = q.bnb_state_dict(key)
        theirs = {key: ref_packed, **{f"{key}.{k}": v for k, v in ref_state.as_dict(packed=True).items()}}
        assert ours.keys() == theirs.keys(), shape
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (shape, k)

        for out_dtype in (dtype, torch.float32):
            got = q.dequantize(out_dtype)
            if _bnb_avx512_dequant_is_wrong(shape, blocksize):
                expected = _float64_dequant(q, out_dtype)
            else:
                ref_state.dtype = out_dtype
                expected = bnb_F.dequantize_4bit(ref_packed, ref_state)
            assert got.dtype == out_dtype and got.shape == w.shape
            assert torch.equal(got, expected), (shape, out_dtype)


def test_double_quant_restores_absmax_and_costs_4127_bits():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    q = nf4tune.quantize(w, double_quant=True)
    plain = nf4tune.quantize(w, double_quant=False)
    assert q.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256)) and round(q.bits_per_parameter, 3) == 4.127
    assert plain.bits_per_parameter == 4.5
    # nbytes is what is really stored: codes, 8-bit absmax, fp32 nested absmax, the offset.
    assert q.nbytes * 8 / w.numel() == pytest.approx(4.127, abs=1e-3)
    assert plain.nbytes * 8 / w.numel() == 4.5
    # Double quantization loses little: absmax within one 8-bit code step of the exact value.
    err = (q.float_absmax() - plain.absmax).abs().max()
    assert err < 0.02 * plain.absmax.max()
    assert (q.dequantize(torch.float32) - plain.dequantize(torch.float32)).abs().max() < 0.05


def test_quantization_error_is_bounded_by_half_a_code_step():
    w = torch.randn(64, 256, dtype=torch.float64).float()
    q = nf4tune.quantize(w, double_quant=False)
    gaps = torch.diff(nf4_code()).max().item()
    scale = q.absmax.repeat_interleave(64).view_as(w)
    assert ((q.dequantize(torch.float32) - w).abs() <= scale * gaps / 2 + 1e-7).all()


def test_state_dict_round_trip_and_reading_bitsandbytes_tensors():
    w = torch.randn(48, 128, dtype=torch.bfloat16)
    key = "model.layers.3.self_attn.q_proj.weight"
    for dq in (True, False):
        q = nf4tune.quantize(w, double_quant=dq)
        back = nf4tune.QuantizedTensor.from_bnb_state_dict(q.bnb_state_dict(key), key)
        assert torch.equal(back.dequantize(), q.dequantize()) and back.shape == w.shape and back.dtype == w.dtype
        packed, state = bnb_F.quantize_4bit(w, compress_statistics=dq, quant_type="nf4")
        theirs = {key: packed, **{f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}}
        from_bnb = nf4tune.QuantizedTensor.from_bnb_state_dict(theirs, key)
        assert torch.equal(from_bnb.dequantize(), bnb_F.dequantize_4bit(packed, state))
    meta = json.loads(bytes(q.bnb_state_dict(key)[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta == {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 128]}


def test_reading_a_broken_state_dict_says_what_is_wrong():
    key = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(nf4tune.QuantizationError, match="not a bitsandbytes 4-bit weight"):
        nf4tune.QuantizedTensor.from_bnb_state_dict({key: torch.zeros(8, 1, dtype=torch.uint8)}, key)
    tensors = nf4tune.quantize(torch.randn(4, 4)).bnb_state_dict(key)
    tensors[key] = tensors[key][:3]
    with pytest.raises(nf4tune.QuantizationError, match="packed bytes do not hold"):
        nf4tune.QuantizedTensor.from_bnb_state_dict(tensors, key)


@pytest.mark.parametrize(
    "w, blocksize, match",
    [
        (torch.ones(4, 4, dtype=torch.int64), 64, "dtype is torch.int64"),
        (torch.ones(4, 4, dtype=torch.complex64), 64, "dtype is torch.complex64"),
        (torch.tensor([1.0, float("nan"), 2.0]), 64, "NaN or Inf"),
        (torch.tensor([1.0, float("inf")]), 64, "NaN or Inf"),
        (torch.empty(0, 8), 64, "empty"),
        (torch.ones(4, 4), 48, "blocksize 48 is not supported"),
        (torch.ones(4, 4), 8192, "blocksize 8192 is not supported"),
    ],
)
def test_bad_input_gets_one_clear_error_naming_the_tensor(w, blocksize, match):
    with pytest.raises(nf4tune.QuantizationError, match=match) as e:
        nf4tune.quantize(w, blocksize=blocksize, name="model.layers.7.mlp.gate_proj.weight")
    assert "model.layers.7.mlp.gate_proj.weight" in str(e.value)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_compiled_cpu_path_is_bit_exact_with_the_reference(monkeypatch, quant_type):
    monkeypatch.setattr(dispatch, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(compiled, "broken", False)
    monkeypatch.setattr(dispatch, "native_library", lambda: (None, "off"))  # AVX-512 would take dequantize over
    gen = torch.Generator().manual_seed(1)
    for shape, blocksize in [((257, 512), 64), ((100, 300), 128)]:  # the second has a partial block
        w = torch.randn(shape, generator=gen).to(torch.bfloat16)
        w[0, :blocksize] = 0
        assert dispatch.path("quantize_4bit", w, quant_type, blocksize).name == dispatch.COMPILED
        packed, absmax = dispatch.quantize_4bit(w, quant_type, blocksize)
        ref_packed, ref_absmax = blockwise.quantize_4bit(w, quant_type, blocksize)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
        for dtype in (torch.bfloat16, torch.float32):
            got = dispatch.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype)
            assert torch.equal(got, blockwise.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype))
    assert not compiled.broken, "the compiled path fell back to the reference"


def test_moving_to_the_same_device_is_free():
    q = nf4tune.quantize(torch.randn(10, 10))
    assert q.device.type == "cpu" and q.to("cpu") is q


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu():
    w = torch.randn(1000, 333, dtype=torch.bfloat16)
    cpu = nf4tune.quantize(w)
    gpu = nf4tune.quantize(w.cuda())
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_8bit_table_lookup_equals_a_binary_search(signed):
    code = dynamic_code(signed=signed)
    assert blockwise._nearest_tables(tuple(code.tolist()), torch.device("cpu")) is not None  # the fast path is taken
    mids = (code[:-1] + code[1:]) / 2
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(500_000, generator=gen) * 2 - 1, torch.randn(50_000, generator=gen) * 1e-6, mids, code,
                   torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                   torch.tensor([0.0, -0.0, 1.0, -1.0])]).clamp(-1, 1)
    x = x if signed else x.abs()
    assert torch.equal(blockwise._nearest_code(x, code), torch.bucketize(x, mids).to(torch.uint8))
