"""`nf4tune eval BASE --adapter A --adapter B [--with-base]`: one table, a column per adapter.

Oracle: each adapter evaluated alone by the same command (its column must be that result, in its place),
and for `--quant-type none` the task run on `load_model(quant_type=None)` directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.layers.lora import lora_layers

DATA = Path(__file__).parent / "data"
TEST, DEV = DATA / "mmlu_test.jsonl", DATA / "mmlu_dev.jsonl"
PERPLEXITY = ["--task", "perplexity", "--data", str(TEST), "--column", "question", "--max-length", "24",
              "--limit", "4"]
CHOICE = ["--task", "multiple_choice", "--data", str(TEST), "--dev", str(DEV), "--shots", "1", "--limit", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny checkpoint and two adapters with different (nonzero) weights, as two runs would leave."""
    root = tmp_path_factory.mktemp("compare")
    base = build_tiny_checkpoint(root / "base", dtype=torch.float32, initializer_range=0.3)
    adapters = []
    for seed in (1, 2):
        model, _ = nf4tune.load_model(base, device="cpu", lora=nf4tune.LoraConfig(r=4, dropout=0.0), progress=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        adapters.append(str(nf4tune.save_adapter(model, root / f"run{seed}" / "adapter")))
    return str(base), adapters


def _eval(capsys, *args) -> str:
    assert main(["eval", *args, "--device", "cpu"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("task", [PERPLEXITY, CHOICE], ids=["perplexity", "multiple_choice"])
def test_each_column_is_that_adapter_evaluated_alone(runs, capsys, task):
    base, (a, b) = runs
    alone = {name: json.loads(_eval(capsys, base, *task, *adapter, "--json"))
             for name, adapter in (("(base)", []), (a, ["--adapter", a]), (b, ["--adapter", b]))}
    key = "perplexity" if task is PERPLEXITY else "predictions"
    assert alone[a][key] != alone[b][key] != alone["(base)"][key]  # the columns can be told apart

    if task is PERPLEXITY:  # (--json's layout does not depend on the task)
        together = json.loads(_eval(capsys, base, *task, "--adapter", a, "--adapter", b, "--with-base", "--json"))
        assert list(together["adapters"]) == ["(base)", a, b]  # the base first, then the adapters as given
        assert together["adapters"] == alone and together["task"] == "perplexity"

    table = _eval(capsys, base, *task, "--adapter", a, "--adapter", b, "--with-base").splitlines()
    assert table[0].split() == ["(base)", a, b]
    if task is PERPLEXITY:
        row = next(line for line in table if line.startswith("perplexity "))
        assert row.split()[1:] == [f"{alone[n]['perplexity']:.4f}" for n in ("(base)", a, b)]
    else:
        n = alone[a]["n"]
        row = next(line for line in table if line.startswith(f"all questions ({n})"))
        assert row.split()[-3:] == [f"{alone[c]['accuracy']:.1%}" for c in ("(base)", a, b)]
        for subject, count in alone[a]["per_subject_n"].items():
            row = next(line for line in table if line.startswith(f"{subject} ({count})"))
            assert row.split()[-3:] == [f"{alone[c]['per_subject'][subject]:.1%}" for c in ("(base)", a, b)]
    assert table[-1] == ("1-shot, letter scoring" if task is CHOICE else f"{alone[a]['windows']} window(s) of 24 "
                         f"tokens with stride {alone[a]['stride']}")


def test_quant_type_none_evaluates_the_16bit_base(runs, capsys):
    from nf4tune.evaluate.perplexity import perplexity, read_text

    base, (a, b) = runs
    got = json.loads(_eval(capsys, base, *PERPLEXITY, "--adapter", a, "--adapter", b, "--quant-type", "none", "--json"))
    nf4 = json.loads(_eval(capsys, base, *PERPLEXITY, "--adapter", a, "--json"))
    for adapter in (a, b):
        model, tok = nf4tune.load_model(base, quant_type=None, adapter=adapter, device="cpu", progress=False)
        expected = perplexity(model, tok, read_text(str(TEST), "question", limit=4), 24,
                              batch_size=8, progress=False)  # the CLI's default batch
        assert got["adapters"][adapter]["perplexity"] == expected.perplexity
    assert got["adapters"][a]["perplexity"] != nf4["perplexity"]  # not the 4-bit base


def test_a_missing_adapter_is_one_sentence_before_any_evaluation(runs, capsys, tmp_path, monkeypatch):
    from nf4tune.evaluate import registry

    base, (a, _) = runs
    monkeypatch.setattr(registry, "run_task", lambda *args, **kwargs: pytest.fail("evaluated before checking"))
    assert main(["eval", base, *PERPLEXITY, "--adapter", a, "--adapter", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} has no adapter_config.json" in capsys.readouterr().err
    assert main(["eval", base, *PERPLEXITY, "--adapter", a, "--adapter", a]) == 2
    assert "the same adapter is named twice" in capsys.readouterr().err
