"""16-bit LoRA (quant_type "none") beside QLoRA, and the int4 ablation type.

Oracles: PEFT on the plain transformers model (adapters, logits, merge), an uninterrupted run (resume),
a float64 nearest-code reconstruction (int4)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune import Nf4tuneError
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.linear4bit import Linear4bit, Linear16bit
from nf4tune.layers.lora import lora_layers
from nf4tune.models.merge import merge_adapter
from nf4tune.plan.estimate import estimate
from nf4tune.quant import quantize
from nf4tune.quant.codes import int4_code
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train

peft = pytest.importorskip("peft", reason="peft is the oracle for these tests")
from transformers import AutoModelForCausalLM  # noqa: E402

IDS = torch.tensor([[1, 40, 41, 42, 15, 77, 90, 3, 60]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora16")
    model = build_tiny_checkpoint(root / "model", dtype=torch.float32)
    rows = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in range(100, 200)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model


def _recipe(root, model, out, quant_type="none"):
    return recipe_from_dict({
        "model": {"name_or_path": str(model), "compute_dtype": "float32"},
        "quant": {"quant_type": quant_type},
        "lora": {"r": 4, "alpha": 16, "dropout": 0.1},
        "data": {"path": str(root / "train.jsonl"), "source_max_len": 32, "target_max_len": 8},
        "eval": {"size": 8, "per_device_eval_batch_size": 8},
        "training": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "lr_scheduler_type": "linear",
                     "logging_steps": 1, "save_steps": 2, "eval_steps": 2, "seed": 5},
    })


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _random_adapter(model, folder, seed=0):
    """Give every adapter a nonzero B (a fresh one is the identity) and save it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    nf4tune.save_adapter(model, folder)


def _load(model, quant_type, **kwargs):
    return nf4tune.load_model(model, quant_type=quant_type, device="cpu", compute_dtype=torch.float32,
                              progress=False, **kwargs)[0]


def _peft_logits(base_path, adapter, dtype=torch.float32):
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, adapter)(IDS).logits.float()


def test_none_trains_resumes_exactly_and_its_adapter_is_peft_s(setup):
    root, model = setup
    out = root / "run"
    train(_recipe(root, model, out), progress=False)
    uninterrupted = _losses(out)
    assert len(uninterrupted) == 4 and len(set(uninterrupted.values())) == 4  # it learns: losses move

    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    train(_recipe(root, model, out), resume=True, progress=False)
    assert _losses(out) == uninterrupted  # steps 3-4 recomputed from checkpoint-2, exactly

    trained = _load(model, "none", adapter=out / "adapter")
    assert all(type(m) is Linear16bit for m in lora_layers(trained).values())
    with torch.no_grad():
        ours = trained(IDS).logits.float()
    reference = _peft_logits(model, out / "adapter")
    assert torch.equal(ours, reference)  # same base weights, same float32 arithmetic as PEFT's Linear


def test_on_a_bf16_base_the_adapter_gives_peft_s_logits_bit_for_bit(tmp_path):
    """The bf16 base computing in bf16 (the 16-bit LoRA the paper compares against): PEFT's model on the same
    checkpoint with the same adapter gives the very same logits (float32 adapters on both sides)."""
    model = build_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    fresh = nf4tune.load_model(model, quant_type=None, device="cpu", compute_dtype=torch.bfloat16, progress=False,
                               lora=nf4tune.LoraConfig(r=4, dropout=0.0))[0]
    _random_adapter(fresh, tmp_path / "adapter")
    ours = nf4tune.load_model(model, quant_type=None, adapter=tmp_path / "adapter", device="cpu",
                              compute_dtype=torch.bfloat16, progress=False)[0]
    assert all(layer.weight.dtype == torch.bfloat16 for layer in lora_layers(ours).values())
    with torch.no_grad():
        logits = ours(IDS).logits.float()
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)(IDS).logits.float()
    assert torch.equal(logits, _peft_logits(model, tmp_path / "adapter", torch.bfloat16))
    assert not torch.equal(logits, base)  # the adapter counts


@pytest.mark.parametrize("quant_type", [None, "none"])
def test_none_puts_lora_on_the_layers_qlora_quantizes(setup, quant_type):
    _, model = setup
    qlora, lora16 = _load(model, "nf4", lora=nf4tune.LoraConfig(r=4)), _load(model, quant_type, lora=nf4tune.LoraConfig(r=4))
    assert sorted(lora_layers(qlora)) == sorted(lora_layers(lora16))
    assert not any(isinstance(m, Linear4bit) and not isinstance(m, Linear16bit) for m in lora16.modules())
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    for name, layer in lora_layers(lora16).items():
        assert torch.equal(layer.weight, reference[f"{name}.weight"]), name  # the base, untouched


def test_none_merge_equals_peft_merge_and_unload(setup, tmp_path):
    _, model = setup
    _random_adapter(_load(model, "none", lora=nf4tune.LoraConfig(r=4, dropout=0.0)), tmp_path / "adapter")
    merge_adapter(model, tmp_path / "adapter", tmp_path / "merged", progress=False)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        assert torch.equal(merged[key], reference[key]), key


@pytest.mark.parametrize("trained_on, loaded_on", [("nf4", "none"), ("none", "nf4")])
def test_adapters_move_between_the_4bit_and_the_16bit_base(setup, tmp_path, trained_on, loaded_on):
    _, model = setup
    source = _load(model, trained_on, lora=nf4tune.LoraConfig(r=4, dropout=0.0))
    _random_adapter(source, tmp_path / "adapter")
    target = _load(model, loaded_on, adapter=tmp_path / "adapter")
    for name, layer in lora_layers(source).items():  # the same tensors under the same PEFT keys
        other = lora_layers(target)[name]
        assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B), name
    nf4tune.save_adapter(target, tmp_path / "again")
    with torch.no_grad():
        ours = target(IDS).logits.float()
    if loaded_on == "none":  # on the 16-bit base nf4tune is PEFT exactly
        assert torch.equal(ours, _peft_logits(model, tmp_path / "adapter"))
    from safetensors.torch import load_file
    saved, again = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), \
        load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_a_wrong_quant_type_is_one_sentence(setup):
    _, model = setup
    with pytest.raises(Nf4tuneError, match="quant_type 'int8' is not one of nf4, fp4, int4, none"):
        _load(model, "int8")
    with pytest.raises(Nf4tuneError, match="quant.quant_type is 'int8'"):
        _recipe(*setup, "out", quant_type="int8")


def test_estimate_sizes_the_16bit_base_at_2_bytes_a_parameter(setup):
    _, model = setup
    qlora = estimate(str(model), device="cpu", compute_dtype="bfloat16")
    lora16 = estimate(str(model), device="cpu", compute_dtype="bfloat16", quant_type="none")
    assert lora16.weights_4bit == lora16.quant_constants == 0
    assert lora16.weights_16bit == 2 * lora16.parameters
    assert qlora.weights_16bit + qlora.quantized_parameters * 2 == lora16.weights_16bit
    assert lora16.total - qlora.total == pytest.approx(lora16.weights_16bit - qlora.weights_16bit
                                                      - qlora.weights_4bit - qlora.quant_constants)


# --- int4 ----------------------------------------------------------------------------------------------


def _int4_reference(w: torch.Tensor, blocksize: int, absmax: torch.Tensor) -> torch.Tensor:
    """Float64 nearest-code reconstruction: each element's nearest level k / 7 of w / absmax(block) (the
    true absmax, ties to the lower level), times the absmax the quantized tensor stores (`absmax`, float32;
    double-quantized or not), rounded once to float32."""
    flat = w.reshape(-1).double()
    blocks = flat.view(-1, blocksize)
    scaled = blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    levels = torch.arange(-7, 8, dtype=torch.float32).div(7).double()  # the float32 table, exactly
    distance = (scaled.unsqueeze(-1) - levels).abs()
    nearest = levels[distance.argmin(dim=-1)]  # argmin takes the first: ties go to the lower level
    return (nearest * absmax.double().unsqueeze(1)).float().view(w.shape)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_int4_round_trip_is_the_float64_nearest_code(double_quant, blocksize):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    w[0, :blocksize] = 0.0  # an all-zero block survives
    w[1, 3] = 0.0  # and so does a zero weight inside a block
    q = quantize(w, "int4", blocksize, double_quant)
    assert q.quant_type == "int4" and q.double_quant == double_quant and q.blocksize == blocksize
    absmax = q.float_absmax()
    true_absmax = w.view(-1, blocksize).abs().amax(dim=1)
    if double_quant:  # the stored scale is the 8-bit dynamic code's of (absmax - mean): within one step of
        # its coarsest decade (64 levels over [0.1, 1] of the nested scale)
        assert (absmax - true_absmax).abs().max() <= q.nested_absmax.max() * 0.9 / 64
        assert q.absmax.dtype == torch.uint8 and not torch.equal(absmax, true_absmax)
    else:
        assert torch.equal(absmax, true_absmax)
    got = q.dequantize(torch.float32)
    assert torch.equal(got, _int4_reference(w, blocksize, absmax))
    assert torch.equal(got[0, :blocksize], torch.zeros(blocksize)) and got[1, 3] == 0


def test_int4_code_is_symmetric_with_an_exact_zero():
    code = int4_code()
    assert torch.equal(code[:15], -code[:15].flip(0)) and code[7] == 0 and code[15] == 0
    assert code.max() == 1 and code.min() == -1 and len(set(code.tolist())) == 15


# --- serving and compiling on the 16-bit base ------------------------------------------------------------


def test_the_decoder_and_engine_on_the_16bit_base_generate_peft_s_greedy_tokens(tmp_path):
    """The lean CPU decoder (and the engine that uses it) on a bf16 base with an adapter: the greedy tokens
    of transformers' generate on the PEFT model in bf16."""
    from nf4tune import dispatch
    from nf4tune.serve import Engine, Request
    from nf4tune.serve.decoder import Decoder
    from nf4tune.serve.sampling import Sampling

    if not dispatch.path("decode_attention", torch.zeros(1)).fast:
        pytest.skip("the decoder needs the AVX-512 CPU kernels")
    # 128-wide projections take the decoder's bf16 dot-product path; weights large enough for clear argmaxes
    path = build_tiny_checkpoint(tmp_path / "model", hidden_size=128, intermediate_size=256, initializer_range=0.1)
    fresh = nf4tune.load_model(path, quant_type=None, device="cpu", compute_dtype=torch.bfloat16, progress=False,
                               lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))[0]
    _random_adapter(fresh, tmp_path / "adapter")
    model, tok = nf4tune.load_model(path, quant_type=None, adapter=tmp_path / "adapter", device="cpu",
                                    compute_dtype=torch.bfloat16, progress=False)
    assert Decoder.unsupported(model) is None
    prompt = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    [tokens] = Decoder(model).generate(prompt, Sampling(max_new_tokens=12))

    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
                                               tmp_path / "adapter").eval()
    with torch.no_grad():
        out = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert tokens == out[0, prompt.shape[1]:].tolist()
    assert len(set(tokens)) > 3  # the adapter's model, not a loop on one token

    engine = Engine(model, tok)
    try:
        assert isinstance(engine.decoder, Decoder)
        text = tok.decode(prompt[0])
        assert tok(text, add_special_tokens=False).input_ids == prompt[0].tolist()
        reply = engine.submit(Request(text, sampling=Sampling(max_new_tokens=12))).wait(60)
        assert reply.text == tok.decode(tokens, skip_special_tokens=True)
    finally:
        engine.close()


def test_compiled_layers_train_the_16bit_base_as_eager_does(setup, monkeypatch):
    """training.compile on quant_type none: no graph break (each decoder layer traced whole, with no 4-bit
    custom op to hide the linear behind; "aot_eager", the capture Inductor gets), the eager run's losses
    and adapter."""
    from safetensors.torch import load_file

    from nf4tune.train import compile as compile_mod

    root, model = setup

    def run(name, compile):
        raw = _recipe(root, model, root / name)
        raw.lora.dropout = 0.0  # compiled dropout draws other random numbers than eager
        raw.training.compile = compile
        raw.training.max_steps, raw.training.save_steps, raw.training.eval_steps = 2, 100, 100
        out = train(raw, progress=False).output_dir
        return _losses(out), load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))

    eager, eager_adapter = run("eager16", False)
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_adapter = run("compiled16", True)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert len(eager) == 2 and eager.keys() == compiled.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)
    for name, value in eager_adapter.items():
        assert torch.allclose(compiled_adapter[name], value, rtol=1e-3, atol=1e-6), name


def test_doctor_says_which_ops_each_quant_type_takes(capsys):
    from nf4tune.cli.main import main
    from nf4tune.registry import BASE_QUANT_TYPES, QUANT_TYPES, UNQUANTIZED

    assert main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["quant_types"]
    assert list(found) == list(BASE_QUANT_TYPES)
    assert all("matmul_4bit" in found[t] for t in QUANT_TYPES) and "no 4-bit op" in found[UNQUANTIZED]
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {t:<5} {what}" in text for t, what in found.items())
