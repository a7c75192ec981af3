"""A training output folder is never overwritten by accident nor mixed with another run; Ctrl-C says
what is saved; an adapter carries its prompt format (issue 16, items 1, 7 and 8)."""

import json
from pathlib import Path

import pytest

from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError
from nf4tune.train import rundir
from nf4tune.train.formats import prompt_format_of, render_plain_prompt, save_prompt_format

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(out: Path, step: int, run_id: str | None = None, r: int = 16) -> Path:
    """A checkpoint folder as train/state.py writes it (the files these checks read)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.pt").write_bytes(b"")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, **({"run_id": run_id} if run_id else {})}))
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def _finished_run(out: Path) -> None:
    _checkpoint(out, 200)
    _checkpoint(out, 300)
    (out / "metrics.jsonl").write_text('{"step": 300, "loss": 0.01}\n')
    (out / "summary.json").write_text("{}")
    (out / "adapter").mkdir()


def test_a_folder_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    with pytest.raises(Nf4tuneError, match=r"already holds a training run \(checkpoint-200, checkpoint-300, summary.json, "
                                           r"\.\.\.\); continue it with --resume, or start over with "
                                           r"training.overwrite_output_dir=true"):
        rundir.prepare_output_dir(out, resume=None, overwrite=False)
    assert (out / "checkpoint-300").is_dir()  # untouched
    assert rundir.prepare_output_dir(out, resume=True, overwrite=False) is None
    assert rundir.prepare_output_dir(tmp_path / "new", resume=None, overwrite=False) is None
    assert (tmp_path / "new").is_dir()


def test_a_run_that_stopped_during_set_up_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old_id = rundir.start_run(out)  # what set-up writes before a model that will not load stops it
    (out / "recipe.json").write_text("{}")
    assert rundir.prepare_output_dir(out, resume=None, overwrite=False) is None
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json", "run.json"]  # reused in place
    assert rundir.start_run(out) != old_id  # the new run is a run of its own
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # a run that took a step is kept
    with pytest.raises(Nf4tuneError, match="already holds a training run"):
        rundir.prepare_output_dir(out, resume=None, overwrite=False)


def test_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    aside = rundir.prepare_output_dir(out, resume=None, overwrite=True)
    assert aside.name.startswith("run.old-") and (aside / "checkpoint-300").is_dir() and (aside / "summary.json").is_file()
    assert out.is_dir() and not any(out.iterdir())
    assert rundir.prepare_output_dir(out, resume=None, overwrite=True) is None  # nothing left to move


def test_cli_refuses_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    _finished_run(out)
    assert main(["train", "recipes/demo.yaml", f"training.output_dir={out}", "training.max_steps=20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already holds a training run") and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-200", "checkpoint-300", "metrics.jsonl",
                                                     "summary.json"]


def test_cli_resume_with_another_rank_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    _checkpoint(out, 20, r=16)
    assert main(["train", "recipes/demo.yaml", f"training.output_dir={out}", "lora.r=8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --resume: {out / 'checkpoint-20'} was trained with lora.r=16 but the recipe now says "
                           "lora.r=8; resume with lora.r=16, or start a new run without --resume.")


def test_resume_fits_compares_the_saved_recipe(tmp_path):
    ckpt = _checkpoint(tmp_path, 10, r=8)
    saved = {"lora": {"r": 8, "target_modules": "all-linear"}, "quant": {"blocksize": 64}, "training": {"seed": 0}}
    now = {"lora": {"r": 8, "target_modules": ["q_proj"]}, "quant": {"blocksize": 64}, "training": {"seed": 1}}
    with pytest.raises(Nf4tuneError, match=r"trained with lora.target_modules=all-linear but the recipe now says "
                                           r"lora.target_modules=\['q_proj'\]"):
        rundir.check_resume_fits(ckpt, now, saved)
    now["lora"]["target_modules"] = "all-linear"
    rundir.check_resume_fits(ckpt, now, saved)  # the seed may change


def test_resume_never_mixes_two_runs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _checkpoint(out, 300, run_id="old")  # left by an earlier run
    run_id = rundir.start_run(out)
    assert rundir.read_run_info(out)["run_id"] == run_id != "old"
    assert rundir.latest_checkpoint_of_run(out) is None
    assert not rundir.should_save_on_interrupt(out, 0)
    assert rundir.should_save_on_interrupt(out, 5)  # no checkpoint of this run yet: save on Ctrl-C
    mine = _checkpoint(out, 20, run_id=run_id)
    assert rundir.latest_checkpoint_of_run(out) == mine
    assert not rundir.should_save_on_interrupt(out, 20)
    assert rundir.should_save_on_interrupt(out, 21)
    rundir.check_checkpoint_run(out, mine)
    with pytest.raises(Nf4tuneError, match="belongs to an earlier run .* resuming would mix the two"):
        rundir.check_checkpoint_run(out, out / "checkpoint-300")
    assert rundir.start_run(out, resume_from=mine) == run_id  # a resumed run keeps its id


def test_run_info_keeps_the_before_accuracy(tmp_path):
    rundir.start_run(tmp_path)
    rundir.update_run_info(tmp_path, exact_match_before=0.5)
    rundir.start_run(tmp_path, resume_from=_checkpoint(tmp_path, 3, run_id=rundir.read_run_info(tmp_path)["run_id"]))
    assert rundir.read_run_info(tmp_path)["exact_match_before"] == 0.5


def test_interrupted_message_names_the_checkpoint_and_the_command(tmp_path):
    stop = rundir.TrainingInterrupted(tmp_path, 37, tmp_path / "checkpoint-37", saved_now=True)
    msg = rundir.interrupted_message(stop, "recipes/demo.yaml", ["training.output_dir=my run", "training.max_steps=50"])
    assert msg == (f"training interrupted at step 37; {tmp_path / 'checkpoint-37'} (saved on interrupt, step 37) holds "
                   "the progress. Continue with: nf4tune train recipes/demo.yaml 'training.output_dir=my run' "
                   "training.max_steps=50 --resume")
    nothing = rundir.interrupted_message(rundir.TrainingInterrupted(tmp_path, 0, None), "r.yaml", [])
    assert "no checkpoint was saved" in nothing and "training.overwrite_output_dir=true" in nothing


def test_adapter_carries_its_prompt_format(tmp_path):
    assert prompt_format_of(tmp_path) is None
    save_prompt_format(tmp_path, "prompt_completion")
    assert prompt_format_of(tmp_path) == "raw"
    save_prompt_format(tmp_path, "oasst1")
    assert prompt_format_of(tmp_path) == "guanaco"
    save_prompt_format(tmp_path, "alpaca")
    assert prompt_format_of(tmp_path) == "alpaca"
    messages = [{"role": "user", "content": "Is 4 even or odd? "}]
    assert render_plain_prompt(messages, "raw") == "Is 4 even or odd? "
    assert render_plain_prompt(messages, "alpaca").endswith("### Instruction:\nIs 4 even or odd? \n\n### Response: ")
    assert render_plain_prompt(messages + [{"role": "assistant", "content": "even"}, {"role": "user", "content": "5?"}],
                               "chip2") == "<human>: Is 4 even or odd? \n<bot>: even\n<human>: 5?\n<bot>: "


@pytest.mark.slow
def test_the_first_run_with_an_empty_cache_equals_later_runs(tmp_path, monkeypatch):
    """Building the demo model on first use must not change what the run draws (issue 16, item 6)."""
    from nf4tune.train.config import load_recipe
    from nf4tune.train.loop import train

    monkeypatch.setenv("NF4TUNE_CACHE", str(tmp_path / "empty-cache"))
    losses = []
    for run in ("first", "second"):
        recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [
            f"training.output_dir={tmp_path / run}", "training.max_steps=3", "training.logging_steps=1",
            "eval.path=null", "eval.exact_match=false", "data.max_samples=64"])
        train(recipe, progress=False)
        losses.append([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
    assert (tmp_path / "empty-cache" / "llama-demo" / "config.json").is_file()  # built during the first run
    assert losses[0] == losses[1]
