"""The QLoRA model: against transformers + bitsandbytes + PEFT, and a float64 reference."""

import json
import logging
import subprocess
import sys

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.quantize import quantize_checkpoint
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.models import checkpointing
from nf4tune.models.checkpointing import disable_checkpointing, enable_checkpointing, is_checkpointing

pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for these tests")
peft = pytest.importorskip("peft", reason="peft is the oracle for these tests")
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig  # noqa: E402

BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
IDS = torch.tensor([[1, 40, 41, 42, 15, 77, 90, 3, 60], [1, 55, 23, 78, 9, 10, 11, 12, 13]])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llama") / "src")


def _randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


def _forward(model, arch):
    with torch.no_grad():
        if arch == "t5":
            return model(input_ids=IDS, decoder_input_ids=IDS[:, :5]).logits.float()
        return model(IDS).logits.float()


def _close(a, b, rel=0.03):
    # Same 4-bit bits and same adapters: what remains is bf16 rounding in different matmul kernels.
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "t5"])
def test_outputs_match_transformers_bitsandbytes_peft(tmp_path, arch):
    src = build_tiny_checkpoint(tmp_path / "src", arch=arch)
    ours, _ = nf4tune.load_model(src, device="cpu", compute_dtype=torch.bfloat16,
                                 lora=nf4tune.LoraConfig(r=8, alpha=16, dropout=0.0))
    assert all(type(m) is not torch.nn.Linear or n.endswith("lm_head") or n.endswith(".wo")
               for n, m in ours.named_modules())
    _randomize_lora(ours)
    nf4tune.save_adapter(ours, tmp_path / "adapter")

    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    base = auto.from_pretrained(src, quantization_config=BNB, dtype=torch.bfloat16, device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    a, b = _forward(ours, arch), _forward(theirs, arch)
    assert _close(a, b), (a - b).abs().max()
    # The adapters matter: without them both models agree with each other but not with the above.
    with theirs.disable_adapter():
        assert not _close(a, _forward(theirs, arch), rel=1e-3)


def test_adapters_saved_by_peft_load_and_fresh_adapters_change_nothing(tmp_path, tiny_llama):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=BNB, dtype=torch.bfloat16, device_map="cpu")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    theirs.eval()

    ours, _ = nf4tune.load_model(tiny_llama, device="cpu", adapter=tmp_path / "peft_adapter")
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_layers(ours)) == sorted(["q_proj", "v_proj", "down_proj"] * 2)
    assert _close(_forward(ours, "llama"), _forward(theirs, "llama"))

    plain, _ = nf4tune.load_model(tiny_llama, device="cpu")
    fresh, _ = nf4tune.load_model(tiny_llama, device="cpu", lora=nf4tune.LoraConfig())
    assert torch.equal(_forward(plain, "llama"), _forward(fresh, "llama"))  # B = 0 at init

    # Round trip through our own format keeps the adapters exactly.
    nf4tune.save_adapter(ours, tmp_path / "ours")
    again, _ = nf4tune.load_model(tiny_llama, device="cpu", adapter=tmp_path / "ours")
    assert torch.equal(_forward(again, "llama"), _forward(ours, "llama"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["peft_type"] == "LORA"


def test_lora_gradients_match_a_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    layer = nf4tune.Linear4bit.from_quantized(nf4tune.quantize(w), bias=torch.randn(48), compute_dtype=torch.float32)
    layer.add_lora(r=6, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 5, 96, requires_grad=True)
    upstream = torch.randn(3, 5, 48)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert torch.Size([48, 96]) not in saved and torch.Size([96, 48]) not in saved  # no dequantized W kept
    (y * upstream).sum().backward()

    w64 = layer.quantized_weight.dequantize(torch.float64)
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_A.detach().double().requires_grad_()
    b64 = layer.lora_B.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + layer.bias.double() + (x64 @ a64.t() @ b64.t()) * layer.scaling
    (y64 * upstream.double()).sum().backward()

    assert torch.allclose(y.double(), y64, rtol=1e-4, atol=1e-5)
    for ours, ref in [(x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)]:
        assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-5)
    assert layer.bias.grad is None and not layer.bias.requires_grad


# transformers' warnings about its renamed checkpointing API (gradient_checkpointing_* became
# activation_checkpointing_* in 5.25), as errors: nf4tune's own calls use the names the installed release has.
RENAMED_CHECKPOINTING_WARNINGS_ARE_ERRORS = pytest.mark.filterwarnings(
    "error:.*checkpointing.*:FutureWarning", "error:.*checkpointing.*:DeprecationWarning")


@RENAMED_CHECKPOINTING_WARNINGS_ARE_ERRORS
def test_only_adapters_train_and_checkpointing_is_on_by_default(tiny_llama):
    model, _ = nf4tune.load_model(tiny_llama, device="cpu", lora=nf4tune.LoraConfig(r=4, dropout=0.1))
    assert is_checkpointing(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_A" in n or ".lora_B" in n for n in trained)
    assert len(trained) == 2 * len(lora_layers(model)) == 28
    off, _ = nf4tune.load_model(tiny_llama, device="cpu", lora=nf4tune.LoraConfig(r=4), gradient_checkpointing=False)
    assert not is_checkpointing(off)
    enable_checkpointing(off)
    assert is_checkpointing(off)
    disable_checkpointing(off)
    assert not is_checkpointing(off)
    if checkpointing.renamed():  # the filter is live: the old name would have failed this test
        with pytest.raises(FutureWarning, match="gradient_checkpointing_enable"):
            off.gradient_checkpointing_enable()


def test_prequantized_checkpoints_load_without_bitsandbytes(tmp_path, tiny_llama):
    quantize_checkpoint(tiny_llama, tmp_path / "ours-4bit", progress=False)
    AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=BNB, dtype=torch.bfloat16,
                                         device_map="cpu").save_pretrained(tmp_path / "bnb-4bit")
    from_16bit, _ = nf4tune.load_model(tiny_llama, device="cpu")
    expected = _forward(from_16bit, "llama")
    for folder in ("ours-4bit", "bnb-4bit"):
        model, tok = nf4tune.load_model(tmp_path / folder, device="cpu")
        assert torch.equal(_forward(model, "llama"), expected)
        assert (tok is not None) == (folder == "ours-4bit")  # save_pretrained of a model writes no tokenizer
    script = (
        "import sys, torch, nf4tune\n"
        f"m, _ = nf4tune.load_model({str(tmp_path / 'bnb-4bit')!r}, device='cpu', progress=False)\n"
        "m(torch.tensor([[1, 2, 3]]))\n"
        "assert 'bitsandbytes' not in sys.modules and 'peft' not in sys.modules, 'runtime imported an oracle'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_unknown_family_falls_back_with_a_warning(tmp_path, caplog):
    src = build_tiny_checkpoint(tmp_path / "opt", arch="opt")
    with caplog.at_level(logging.WARNING, logger="nf4tune"):
        model, _ = nf4tune.load_model(src, device="cpu")
    assert "'opt' is not a tested family" in caplog.text and "fc1" in caplog.text
    assert isinstance(model.model.decoder.layers[0].fc1, nf4tune.Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, nf4tune.Linear4bit)  # 16-bit


def test_adapter_mismatches_get_clear_errors(tmp_path, tiny_llama):
    wider = build_tiny_checkpoint(tmp_path / "wider", hidden_size=128, intermediate_size=256)
    model, _ = nf4tune.load_model(wider, device="cpu", lora=nf4tune.LoraConfig(r=4))
    nf4tune.save_adapter(model, tmp_path / "wide_adapter")
    with pytest.raises(nf4tune.Nf4tuneError, match="does not fit this model.*trained on another base model"):
        nf4tune.load_model(tiny_llama, device="cpu", adapter=tmp_path / "wide_adapter")

    phi3 = build_tiny_checkpoint(tmp_path / "phi3", arch="phi3")
    model, _ = nf4tune.load_model(phi3, device="cpu", lora=nf4tune.LoraConfig(r=4))
    nf4tune.save_adapter(model, tmp_path / "phi_adapter")
    with pytest.raises(nf4tune.Nf4tuneError, match="(qkv|gate_up)_proj, which is not a 4-bit linear layer of this model"):
        nf4tune.load_model(tiny_llama, device="cpu", adapter=tmp_path / "phi_adapter")

    with pytest.raises(nf4tune.Nf4tuneError, match="has no adapter_config.json"):
        nf4tune.load_model(tiny_llama, device="cpu", adapter=tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "wide_adapter" / "adapter_config.json").read_text())
    (tmp_path / "wide_adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(nf4tune.Nf4tuneError, match="rank r=0"):
        nf4tune.load_model(wider, device="cpu", adapter=tmp_path / "wide_adapter")
    with pytest.raises(nf4tune.Nf4tuneError, match="rank r must be a positive integer"):
        nf4tune.LoraConfig(r=0)
    with pytest.raises(nf4tune.Nf4tuneError, match="matches no 4-bit linear layer"):
        nf4tune.load_model(tiny_llama, device="cpu", lora=nf4tune.LoraConfig(target_modules=["c_attn"]))
