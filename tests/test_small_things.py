"""Issue 16, item 9: the small things a new user notices."""

import json
import re

import pytest

from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError


def test_builtin_name_works_for_quantize_and_estimate(tmp_path, capsys):
    assert main(["estimate", "tiny-random:llama-demo", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    # the demo model has 2 layers x (4 attention + 3 MLP projections) of 128-wide weights: 425,984 quantized
    assert "426.0K quantized parameters" in out and "0.00B" not in out and "0.00 GiB" not in out
    assert main(["quantize", "tiny-random:llama-demo", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "q" / "config.json").is_file()
    # the progress bar is labelled with what it reads and ends at its total
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    m = re.search(r"quantizing llama-demo: 100%.*?([\d.]+k?)/([\d.]+k?) ", last)
    assert m and m[1] == m[2], last


def test_plural_in_the_training_summary():
    from nf4tune.cli.train import _plural

    assert _plural(1, "row") == "1 row" and _plural(0, "row") == "0 rows" and _plural(3, "step") == "3 steps"


def test_loss_plot_ticks_are_round():
    from nf4tune.train.plot import nice_ticks

    assert nice_ticks(10, 300, integer=True) == [50, 100, 150, 200, 250, 300]
    assert nice_ticks(0.0123, 4.31) == [1, 2, 3, 4]
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3]
    assert nice_ticks(3.9, 4.25) == pytest.approx([3.9, 4.0, 4.1, 4.2])


def test_estimate_counts_read_well():
    from nf4tune.plan.estimate import format_count

    assert [format_count(n) for n in (6_738_415_616, 170_300_000, 98_304, 512)] == ["6.74B", "170.3M", "98.3K", "512"]


def test_a_broken_json_row_is_named_whole(tmp_path):
    from nf4tune.checkpoint.tiny import char_tokenizer
    from nf4tune.train.data import load_examples

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "tab\there", "completion": "c"}\n')
    with pytest.raises(Nf4tuneError) as e:
        load_examples(str(data), "train", "auto", char_tokenizer(), 32, 8, False)
    assert "row 2" in str(e.value) and "Invalid control character at column 16" in str(e.value)


def test_print_config_states_the_path_rule(capsys, monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["train", "recipes/demo.yaml", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# relative paths: data.path and eval.path are read from the current folder, else from "
                          "the recipe's folder; training.output_dir is relative to the current folder")
    assert f"#   training.output_dir: {Path.cwd() / 'demo-out' / 'parity'}" in out
    assert f"#   data.path: {Path.cwd() / 'recipes' / 'data' / 'parity_train.jsonl'}" in out
    import yaml

    assert yaml.safe_load(out)["training"]["overwrite_output_dir"] is False  # comments aside, still YAML
    assert json.dumps(yaml.safe_load(out))  # plain data


def test_the_loading_bar_is_labelled_and_reaches_its_total(capsys):
    from nf4tune import load_model
    from nf4tune.checkpoint.tiny import builtin_path

    load_model(builtin_path("tiny-random:llama-demo"), device="cpu")
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    m = re.search(r"loading llama-demo \(4-bit\): 100%.*?([\d.]+k?)/([\d.]+k?) ", last)
    assert m and m[1] == m[2], last
