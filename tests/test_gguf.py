"""GGUF files in (`load_model` on a .gguf) and out (`nf4tune export`), against transformers' GGUF loader."""

from __future__ import annotations

import pytest
import torch

import nf4tune
from nf4tune.layers.linear4bit import Linear4bit

pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install gguf)")


def _transformers_gguf_model(gguf_file):
    """The oracle: transformers' own GGUF loader (it dequantizes every tensor to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).eval()


def assert_same_as_quantized_oracle(model, oracle_state: dict, dtype: torch.dtype) -> None:
    """Every 4-bit weight of `model` is nf4tune's quantization of the oracle's tensor, byte for byte, and
    every other tensor is the oracle's cast to `dtype`."""
    linears = {name for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert linears, "no 4-bit layers"
    for name in linears:
        q = model.get_submodule(name).quantized_weight
        expected = nf4tune.quantize(oracle_state[f"{name}.weight"], "nf4", 64, True)
        got, want = q.bnb_state_dict("w"), expected.bnb_state_dict("w")
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
    for key, param in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in linears or key not in oracle_state or "lora" in key:
            continue
        assert torch.equal(param, oracle_state[key].to(dtype)), key


def _save_as_safetensors(model, folder) -> None:
    """A transformers model's state as a plain checkpoint folder (its tied head left out, as transformers does)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, str(folder / "model.safetensors"))
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.real_model
def test_real_gguf_loads_as_transformers_reads_it_quantized_by_nf4tune(smollm2_gguf, tmp_path):
    """The Q4_1 SmolLM2 file: tensors, config and tokenizer as transformers builds them, then NF4."""
    model, tokenizer = nf4tune.load_model(smollm2_gguf, device="cpu", compute_dtype=torch.bfloat16, progress=False)
    oracle = _transformers_gguf_model(smollm2_gguf)
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert_same_as_quantized_oracle(model, oracle.state_dict(), torch.bfloat16)

    # Logits bit for bit against nf4tune loading transformers' dequantized weights from safetensors.
    _save_as_safetensors(oracle, tmp_path / "oracle")
    del oracle
    reference, _ = nf4tune.load_model(tmp_path / "oracle", device="cpu", compute_dtype=torch.bfloat16, progress=False)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # A folder holding the .gguf is the same model.
    assert nf4tune.load_model(smollm2_gguf.parent, device="cpu", progress=False)[0].config.num_hidden_layers == 30
