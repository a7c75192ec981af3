"""Recipe overrides anywhere on the `train` command line, and `--resume` taking a path only if it is one
(issue 17, "Also"). The parsing is checked on the namespace the command runs with; the two command lines
the issue names also run end to end."""

import json
import resource
from pathlib import Path

from nf4tune.cli import train as train_cli
from nf4tune.cli.main import build_parser, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "demo.yaml")


def _parse(*words):
    return parse_args(build_parser(), ["train", RECIPE, *words])


def test_override_after_a_flag_is_an_override():
    args = _parse("--no-progress", "lora.r=64")
    assert args.overrides == ["lora.r=64"] and args.progress is False and args.resume is None


def test_overrides_before_between_and_after_flags_keep_their_order():
    args = _parse("lora.r=8", "--nproc", "2", "lora.r=32", "--no-progress", "training.seed=3", "lora.r=64")
    assert args.overrides == ["lora.r=8", "lora.r=32", "training.seed=3", "lora.r=64"]
    assert args.nproc == 2
    # torchrun starts each rank with the same overrides, in the same order
    command = train_cli.torchrun_command(args)
    assert command[command.index(RECIPE) + 1:][:4] == args.overrides


def test_resume_followed_by_an_override_means_the_latest_checkpoint():
    args = _parse("--resume", "training.max_steps=45")
    assert args.resume is True and args.overrides == ["training.max_steps=45"]
    args = _parse("lora.r=8", "--resume=training.max_steps=45", "--no-progress")
    assert args.resume is True and args.overrides == ["lora.r=8", "training.max_steps=45"]
    args = _parse("--resume")
    assert args.resume is True and args.overrides == []


def test_resume_takes_a_path_that_exists_even_with_an_equals_sign(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run=1").mkdir()
    args = _parse("--resume", "run=1", "lora.r=16")
    assert args.resume == "run=1" and args.overrides == ["lora.r=16"]
    args = _parse("--resume", "out/checkpoint-40")  # no '=': a path, missing or not (the loop says which)
    assert args.resume == "out/checkpoint-40" and args.overrides == []


def test_a_word_that_is_neither_flag_nor_override_is_still_refused(capsys):
    assert main(["train", RECIPE, "--no-progress", "lora.r"]) == 2
    assert main(["train", RECIPE, "--bogus", "lora.r=4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: unrecognized arguments: lora.r (see nf4tune --help)",
                   "error: unrecognized arguments: --bogus (see nf4tune --help)"]
    assert main(["estimate", "x", "lora.r=4"]) == 2  # only commands taking overrides take key=value
    assert "unrecognized arguments: lora.r=4" in capsys.readouterr().err


def test_the_two_command_lines_of_the_issue_train_and_resume(tmp_path, monkeypatch, capsys, caplog):
    """`train r.yaml --no-progress lora.r=64` trains with rank 64; `--resume training.max_steps=4`
    continues that run from its latest checkpoint up to the new step count. The same run shows the
    memory figures are peaks, named as such (test_peak_memory.py has the rest)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    small = [f"training.output_dir={out}", "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1",
             "eval.exact_match=false", "eval.max_eval_samples=4", "data.max_samples=32"]
    assert main(["train", RECIPE, "--no-progress", "lora.r=64", *small]) == 0
    printed = capsys.readouterr()
    assert "training:" not in printed.err  # --no-progress was taken: no progress bar
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_memory_gib"] <= process_peak + 1e-3 and "ru_maxrss" in summary["peak_memory_measure"]
    assert f"peak memory {summary['peak_memory_gib']:.2f} GiB (peak resident set" in printed.out
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 64
    with caplog.at_level("INFO", logger="nf4tune"):
        assert main(["train", RECIPE, "--no-progress", "lora.r=64", *small, "--resume", "training.max_steps=4"]) == 0
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and json.loads((out / "summary.json").read_text())["steps"] == 4
    peaks = [r["peak_memory_gib"] for r in records]
    assert peaks == sorted(peaks) and peaks[-1] <= json.loads((out / "summary.json").read_text())["peak_memory_gib"]
