"""`nf4tune merge` against PEFT's merge_and_unload on the 16-bit model."""

import json

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.quantize import quantize_checkpoint
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.layers.lora import lora_layers
from nf4tune.models.merge import merge_adapter

peft = pytest.importorskip("peft", reason="peft is the oracle for these tests")
from transformers import AutoModelForCausalLM  # noqa: E402

IDS = torch.tensor([[1, 40, 41, 42, 15, 77, 90, 3, 60]])


def _trained_adapter(src, folder, r=4, **lora):
    model, _ = nf4tune.load_model(src, device="cpu", lora=nf4tune.LoraConfig(r=r, dropout=0.0, **lora))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    nf4tune.save_adapter(model, folder)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_clean_merge_equals_peft_merge_and_unload(tmp_path, dtype):
    src = build_tiny_checkpoint(tmp_path / "src", dtype=dtype)
    _trained_adapter(src, tmp_path / "adapter", use_rslora=dtype == torch.float32)
    assert main(["merge", str(src), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0

    base = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    ref_state, our_state = reference.state_dict(), merged.state_dict()
    assert ref_state.keys() == our_state.keys()
    for key in ref_state:
        assert torch.equal(our_state[key], ref_state[key]), key
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()  # sharded like the base


def test_dequantized_merge_keeps_the_trained_function(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "src", dtype=torch.float32)
    qlora = _trained_adapter(src, tmp_path / "adapter")
    merge_adapter(src, tmp_path / "adapter", tmp_path / "exact", dequantized=True, progress=False)
    merge_adapter(src, tmp_path / "adapter", tmp_path / "clean", progress=False)
    with torch.no_grad():
        trained = qlora(IDS).logits.float()
        exact = AutoModelForCausalLM.from_pretrained(tmp_path / "exact")(IDS).logits
        clean = AutoModelForCausalLM.from_pretrained(tmp_path / "clean")(IDS).logits
    # The dequantized merge reproduces the 4-bit model up to bf16 compute; the clean one differs by
    # the quantization error of the base.
    assert (exact - trained).abs().max() < (clean - trained).abs().max()
    assert (exact - trained).abs().max() <= 0.03 * trained.abs().max()


def test_merge_into_a_4bit_base_dequantizes_it(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "src")
    quantize_checkpoint(src, tmp_path / "q", progress=False)
    _trained_adapter(src, tmp_path / "adapter")
    report = merge_adapter(tmp_path / "q", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert report.dequantized and report.merged == 14
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merge_adapter(src, tmp_path / "adapter", tmp_path / "from16", dequantized=True, progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "from16").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_merge_refuses_an_adapter_of_another_model(tmp_path, capsys):
    src = build_tiny_checkpoint(tmp_path / "src")
    wider = build_tiny_checkpoint(tmp_path / "wider", hidden_size=128, intermediate_size=256)
    _trained_adapter(wider, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["merge", str(src), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "another base model" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
