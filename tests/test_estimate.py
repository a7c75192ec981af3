"""`nf4tune estimate` against the QLoRA paper's accounting for LLaMA 7B-65B."""

import json

import pytest

from nf4tune import Nf4tuneError
from nf4tune.cli.main import main
from nf4tune.plan.estimate import GIB, estimate

# LLaMA 1 shapes (hidden, intermediate, layers, heads) and their published parameter counts.
LLAMA = {"7b": (4096, 11008, 32, 32, 6.74e9), "13b": (5120, 13824, 40, 40, 13.0e9),
         "33b": (6656, 17920, 60, 52, 32.5e9), "65b": (8192, 22016, 80, 64, 65.2e9)}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    paths = {}
    for name, (h, i, n, heads, _) in LLAMA.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": 32000,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
        paths[name] = str(root / name)
    return paths


def test_weights_cost_4127_bits_and_65b_fits_in_48gb(configs):
    for name, path in configs.items():
        est = estimate(path)
        assert est.parameters == pytest.approx(LLAMA[name][4], rel=0.01)
        bits = (est.weights_4bit + est.quant_constants) * 8 / est.quantized_parameters
        assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256)) and round(bits, 3) == 4.127
        assert est.weights_16bit == (est.parameters - est.quantized_parameters) * 2
    big = estimate(configs["65b"])
    assert big.total_without_paged_states < 48 * GIB < big.total  # paging is what makes 65B fit
    assert big.fits() == {24: False, 40: False, 48: True, 80: True}
    assert estimate(configs["7b"]).fits()[24]
    assert estimate(configs["7b"], optim="adamw_torch").optimizer_pageable is False


def test_options_move_the_components_they_should(configs):
    base = estimate(configs["7b"])
    eight = estimate(configs["7b"], optim="paged_adamw_8bit")
    assert eight.optimizer_states == pytest.approx(base.optimizer_states * 2.03125 / 8)
    assert estimate(configs["7b"], checkpointing=False).activations > 10 * base.activations
    # linear in the sequence (below the lengths where long-context layers tile the MLP: tests/test_estimate_seq.py)
    assert 2 * estimate(configs["7b"], seq_len=1024).activations == pytest.approx(base.activations)
    assert estimate(configs["7b"], r=16).lora == pytest.approx(base.lora / 4)
    # the outputs kept for the recompute (layers.kept_outputs) are capped by the model's default budget
    from nf4tune.models.peft_compat import Nf4tuneState
    assert base.kept_outputs == Nf4tuneState().kept_outputs_gib * 2**30
    assert estimate(configs["7b"], checkpointing=False).kept_outputs == 0
    assert estimate(configs["7b"], target="q_proj,v_proj").lora_parameters == 32 * 2 * 64 * (4096 + 4096)
    two = estimate(configs["7b"], gpus=2)
    assert two.weights_4bit == base.weights_4bit / 2 and two.activations == base.activations


def test_float32_compute_doubles_the_unquantized_weights_and_activations(configs, capsys):
    half, auto = estimate(configs["7b"]), estimate(configs["7b"], compute_dtype="auto")
    full = estimate(configs["7b"], compute_dtype="float32")
    assert estimate(configs["7b"], compute_dtype="float16").total == half.total == auto.total
    assert full.weights_16bit == (full.parameters - full.quantized_parameters) * 4 == 2 * half.weights_16bit
    assert full.activations == 2 * half.activations and full.kept_outputs == half.kept_outputs  # kept: at its budget
    assert estimate(configs["7b"], compute_dtype="float32", seq_len=64).kept_outputs == pytest.approx(
        2 * estimate(configs["7b"], seq_len=64).kept_outputs)
    # float32 LoRA masters, gradients and states, float32 logits: the same in either
    assert (full.lora, full.gradients, full.optimizer_states, full.logits) == (
        half.lora, half.gradients, half.optimizer_states, half.logits)
    assert main(["estimate", configs["7b"], "--compute-dtype", "float32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weights_16bit"] == full.weights_16bit and data["compute_dtype"] == "float32"
    assert main(["estimate", configs["7b"], "--compute-dtype", "float32"]) == 0
    assert "embeddings, norms, output head (float32)" in capsys.readouterr().out
    with pytest.raises(Nf4tuneError, match="--compute-dtype 'float64': use one of bfloat16, float16, float32"):
        estimate(configs["7b"], compute_dtype="float64")


def test_the_command_prints_a_table_or_json(configs, capsys):
    assert main(["estimate", configs["65b"]]) == 0
    out = capsys.readouterr().out
    assert "4-bit weights" in out and "activations" in out and "fits on: 24 GB no, 40 GB no, 48 GB yes, 80 GB yes" in out
    assert main(["estimate", configs["13b"], "--json", "--optim", "paged_adamw_8bit"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits_gb"]["24"] is True and data["optimizer_pageable"] is True


def test_bad_input_gets_one_sentence(tmp_path, configs, capsys):
    with pytest.raises(Nf4tuneError, match="has no config.json"):
        estimate(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(Nf4tuneError, match="unknown architecture 'no-such-arch'"):
        estimate(str(tmp_path))
    with pytest.raises(Nf4tuneError, match="must be positive"):
        estimate(configs["7b"], seq_len=-5)
    assert main(["estimate", configs["7b"], "--seq-len", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
