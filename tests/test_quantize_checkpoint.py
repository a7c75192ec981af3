"""`nf4tune quantize` against transformers + bitsandbytes `save_pretrained` on tiny random models."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nf4tune import Nf4tuneError
from nf4tune.checkpoint import quantize as quantize_mod
from nf4tune.checkpoint import writer as writer_mod
from nf4tune.checkpoint.quantize import quantize_checkpoint
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main

pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for these tests")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def _bnb_config(quant_type, double_quant):
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@pytest.mark.parametrize(
    "arch, dtype, quant_type, double_quant",
    [
        ("llama", torch.bfloat16, "nf4", True),
        ("qwen2", torch.float32, "fp4", False),  # qwen2: q/k/v biases stay 16-bit
        ("mistral", torch.float16, "nf4", False),
    ],
)
def test_identical_to_transformers_bitsandbytes_save_pretrained(tmp_path, arch, dtype, quant_type, double_quant):
    src = build_tiny_checkpoint(tmp_path / "src", arch=arch, dtype=dtype)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded, to exercise streaming

    quantize_checkpoint(src, tmp_path / "ours", quant_type, double_quant, progress=False)

    reference = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=_bnb_config(quant_type, double_quant), device_map="cpu"
    )
    reference.save_pretrained(tmp_path / "theirs")

    ours, theirs = _read_all(tmp_path / "ours"), _read_all(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert any(k.endswith(f".quant_state.bitsandbytes__{quant_type}") for k in ours)

    our_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    their_cfg = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert our_cfg["quantization_config"] == their_cfg["quantization_config"]
    assert (tmp_path / "ours" / "tokenizer.json").is_file()

    # transformers + bitsandbytes load our folder as it is, and compute what the reference computes.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    src = build_tiny_checkpoint(tmp_path / "src")
    events = []
    real_iter, real_save = quantize_mod.iter_tensors, writer_mod.save_file

    def iter_tensors(shard):
        events.append(("open", Path(shard).name))
        yield from real_iter(shard)

    def save_file(tensors, path, metadata=None):
        events.append(("save", Path(path).name))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(quantize_mod, "iter_tensors", iter_tensors)
    monkeypatch.setattr(writer_mod, "save_file", save_file)
    quantize_checkpoint(src, tmp_path / "out", progress=False)
    kinds = [kind for kind, _ in events]
    assert kinds == ["open", "save"] * (len(kinds) // 2) and len(kinds) >= 4
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {name for kind, name in events if kind == "save"}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


def test_errors_are_one_sentence_and_leave_nothing_behind(tmp_path, capsys):
    src = build_tiny_checkpoint(tmp_path / "src")

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-arch"}))
    for f in src.glob("*.safetensors"):
        (unknown / f.name).write_bytes(f.read_bytes())
    with pytest.raises(Nf4tuneError, match="unknown architecture 'no-such-arch'"):
        quantize_checkpoint(unknown, tmp_path / "out1", progress=False)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((src / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(Nf4tuneError, match="cannot be read"):
        quantize_checkpoint(corrupt, tmp_path / "out2", progress=False)

    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    (bin_only / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(Nf4tuneError, match="only PyTorch .bin weights"):
        quantize_checkpoint(bin_only, tmp_path / "out3", progress=False)

    for out in ("out1", "out2", "out3"):
        assert not (tmp_path / out).exists()
    assert _leftovers(tmp_path) == []

    # Through the command: one line on stderr, exit code 2, no traceback.
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    quantize_checkpoint(src, tmp_path / "done", progress=False)
    assert main(["quantize", str(src), str(tmp_path / "done")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "done"), str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_demo_command_builds_quantizes_and_reads_back(tmp_path, capsys):
    assert main(["quantize", "--demo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4.127 bits" in out and "read back" in out
    error = float(out.split("worst relative error of a weight ")[1].split()[0])
    assert 0 < error < 0.15  # NF4 on Gaussian weights: about 0.09
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama-bnb-4bit-nf4", device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
