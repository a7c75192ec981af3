"""A checkpoint cannot run code, one run writes into a folder at a time, no command writes onto its
inputs or silently over an existing output, and a full disk is said in one sentence that keeps the
last checkpoint (and the final adapter) whole."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError
from nf4tune.train import rundir
from nf4tune.train import state as state_mod
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = build_tiny_checkpoint(root / "model")
    rows = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in range(100, 160)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model


def _raw(root: Path, model: Path, out: Path, **training) -> dict:
    return {
        "model": {"name_or_path": str(model), "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 16},
        "data": {"path": str(root / "train.jsonl"), "source_max_len": 32, "target_max_len": 8},
        "training": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "save_steps": 2, "learning_rate": 1e-3, "seed": 3, **training},
    }


def _recipe_file(root: Path, raw: dict, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_sentence(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line[line.index("error: "):] for line in err.strip().splitlines() if "error: " in line]  # after a progress bar
    assert len(lines) == 1, err
    return lines[0]


# --- a checkpoint cannot run code ---------------------------------------------------------------

class _RunsCode:
    """Unpickled, it would write the marker file: what a crafted trainer_state.pt can do with pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def finished(setup):
    """A finished 4-step run with checkpoints 2 and 4."""
    root, model = setup
    out = root / "finished"
    train(recipe_from_dict(_raw(root, model, out)), progress=False)
    return out


def _copy_run(finished: Path, to: Path) -> Path:
    shutil.copytree(finished, to)
    shutil.rmtree(to / "checkpoint-4")
    shutil.rmtree(to / "adapter")
    return to


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_crafted_checkpoint_runs_no_code_on_resume(setup, finished, tmp_path, capsys, how):
    root, model = setup
    out = _copy_run(finished, tmp_path / "run")
    marker = tmp_path / "marker"
    state_file = out / "checkpoint-2" / "trainer_state.pt"
    payload = {"step": 2, "evil": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, state_file)
    else:
        import pickle

        state_file.write_bytes(pickle.dumps(payload))
    recipe = _recipe_file(tmp_path, _raw(root, model, out), "resume")
    assert main(["train", str(recipe), "--resume", "--no-progress"]) == 2
    sentence = _one_sentence(capsys)
    assert f"{state_file} holds Python objects that only running code could load" in sentence
    assert "start again without --resume" in sentence
    assert not marker.exists()  # nothing ran
    with pytest.raises(Nf4tuneError, match="only running code could load"):  # the library refuses it too
        train(recipe_from_dict(_raw(root, model, out)), resume=True, progress=False)
    assert not marker.exists()


def test_a_real_checkpoint_loads_without_unpickling_code(finished):
    state = state_mod.load_trainer_state(finished / "checkpoint-2")
    assert state["step"] == 2 and isinstance(state["optimizer"], dict)
    lazy = state_mod.load_trainer_state(finished / "checkpoint-2", lazily=True)
    assert torch.equal(lazy["rng"]["torch"], state["rng"]["torch"])


@pytest.mark.parametrize("content, problem", [
    ([1, 2, 3], "it holds list, not a dict"),
    ({"step": "2"}, "'step' is str"),
    ({"step": 2, "tokens": 5, "skipped_steps": 0, "scheduler": {}, "data_position": {"epoch": 0}, "rng": {},
      "best_eval_loss": None, "best_checkpoint": None}, "'data_position' lacks its epoch and index"),
])
def test_a_state_of_the_wrong_shape_is_one_sentence(tmp_path, content, problem):
    (tmp_path / "checkpoint-2").mkdir()
    torch.save(content, tmp_path / "checkpoint-2" / "trainer_state.pt")
    with pytest.raises(Nf4tuneError, match="is not a training state nf4tune wrote") as caught:
        state_mod.load_trainer_state(tmp_path / "checkpoint-2")
    assert problem in str(caught.value) and "resume from an earlier checkpoint" in str(caught.value)


def test_a_sharded_optimizer_checkpoint_s_metadata_runs_no_code(tmp_path):
    """torch.distributed.checkpoint reads its `.metadata` with plain pickle: nf4tune reads it with an
    allow-list, so a real one loads and a crafted one is refused."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from nf4tune.train.parallel import LossModule, Parallel, read_dcp_metadata

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optimizer": get_optimizer_state_dict(LossModule(model, None, 0), optimizer)},
                 checkpoint_id=str(tmp_path / "ckpt" / "optimizer"))
    model.zero_grad(set_to_none=True)  # as in a new process: DCP fills a fresh optimizer's states only then
    fresh = torch.optim.AdamW(model.parameters())
    Parallel().load_optimizer(model, fresh, {"optimizer": None}, tmp_path / "ckpt")  # as a 2 -> 1 resume reads it
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
    metadata = tmp_path / "ckpt" / "optimizer" / ".metadata"
    with open(metadata, "rb") as ours, open(metadata, "rb") as plain:
        assert read_dcp_metadata(ours, metadata).state_dict_metadata.keys() == pickle.load(plain).state_dict_metadata.keys()

    marker = tmp_path / "marker"
    metadata.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(Nf4tuneError, match=r"holds Python objects that only running code could load \(builtins.exec\)"):
        Parallel().load_optimizer(model, optimizer, {"optimizer": None}, tmp_path / "ckpt")
    assert not marker.exists()


# --- one run per folder -------------------------------------------------------------------------

def _cli(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nf4tune.cli.main", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _holder_pid(lock: Path, deadline: float) -> int | None:
    while time.time() < deadline:
        try:
            return json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    return None


def _logged_steps(out: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def test_a_second_train_into_a_folder_in_use_is_refused_and_a_killed_run_s_lock_is_taken_over(
        setup, tmp_path, capsys, caplog):
    root, model = setup
    out = tmp_path / "run"
    recipe = _recipe_file(tmp_path, _raw(root, model, out, max_steps=100000, save_steps=100000), "long")
    first = _cli("train", str(recipe), "--no-progress")
    try:
        pid = _holder_pid(out / "nf4tune.lock", time.time() + 120)
        assert pid == first.pid, first.communicate(timeout=5) if first.poll() is not None else pid
        second = _recipe_file(tmp_path, _raw(root, model, out, max_steps=2), "second")  # would end at once if let in
        assert main(["train", str(second), "--no-progress"]) == 2
        sentence = _one_sentence(capsys)
        assert sentence.startswith(f"error: {out} is in use by another training run (process {first.pid} on "
                                   f"{socket.gethostname()}, started ")
        assert "wait for it to end or stop it, or choose another training.output_dir." in sentence
        deadline = time.time() + 180
        while first.poll() is None and time.time() < deadline and not _logged_steps(out):
            time.sleep(0.1)
        assert first.poll() is None and _logged_steps(out)  # the first run goes on, untouched
    finally:
        first.kill()
        first.communicate()
    # SIGKILL left the lock file behind: the next run takes it over, saying so, and trains.
    assert json.loads((out / "nf4tune.lock").read_text())["pid"] == first.pid
    short = _recipe_file(tmp_path, _raw(root, model, out, max_steps=2, overwrite_output_dir=True), "short")
    caplog.set_level(logging.INFO, logger="nf4tune")
    assert main(["train", str(short), "--no-progress"]) == 0
    assert f"taking over the lock {out / 'nf4tune.lock'} left by process {first.pid} on" in caplog.text
    assert not (out / "nf4tune.lock").exists()  # released at the end
    [aside] = tmp_path.glob("run.old-*")  # the killed run had trained: moved aside, without its lock
    assert _logged_steps(aside) and not (aside / "nf4tune.lock").exists()
    assert _logged_steps(out) == [1, 2]  # and nothing of it is mixed into the new run


def _hold_lock_in_another_process(lock: Path) -> subprocess.Popen:
    code = ("import sys, time; from nf4tune.runlock import acquire; acquire(sys.argv[1], 'busy'); "
            "print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_locks_refuse_a_live_holder_take_over_a_dead_one_and_are_reentrant(tmp_path, caplog):
    from nf4tune import runlock

    lock = tmp_path / "x.lock"
    holder = _hold_lock_in_another_process(lock)
    try:
        with pytest.raises(Nf4tuneError, match=rf"^busy here \(process {holder.pid} on {socket.gethostname()}, started "):
            runlock.acquire(lock, "busy here")
    finally:
        holder.kill()
        holder.wait()
    caplog.set_level(logging.WARNING, logger="nf4tune")
    first = runlock.acquire(lock, "busy")  # the holder was killed: its lock is stale
    assert f"left by process {holder.pid} on {socket.gethostname()}" in caplog.text
    again = runlock.acquire(lock, "busy")  # the same process: re-entrant
    assert again is first and json.loads(lock.read_text())["pid"] == os.getpid()
    again.release()
    assert lock.exists()
    first.release()
    assert not lock.exists()
    # A lock written on another host is never taken over: whether that process lives cannot be told from here.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    with pytest.raises(Nf4tuneError, match="process 1 on elsewhere.*if that run has ended, delete the lock file"):
        runlock.acquire(lock, "busy")


def test_two_generates_into_one_out_are_refused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    holder = _hold_lock_in_another_process(tmp_path / "out.jsonl.lock")
    try:
        assert main(["generate", str(model), "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"{out} is being written by another nf4tune generate (process {holder.pid} on " in _one_sentence(capsys)
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_half_written_files_of_a_killed_run_are_removed_at_the_next_start(tmp_path, caplog):
    out = tmp_path / "run"
    (out / ".checkpoint-6.k2j3.partial").mkdir(parents=True)
    (out / ".checkpoint-6.k2j3.partial" / "trainer_state.pt").write_bytes(b"half")
    (out / ".run.json.x1.partial").write_text("{")
    (out / "notes.partial").write_text("the user's")  # not nf4tune's: kept
    caplog.set_level(logging.INFO, logger="nf4tune")
    lock, _ = rundir.claim_output_dir(out, resume=None, overwrite=False)
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == ["notes.partial"]
    assert "removed what an interrupted run left half-written" in caplog.text and ".checkpoint-6.k2j3.partial" in caplog.text


# --- no command writes onto its inputs or over an existing output -------------------------------

def test_quantize_replaces_an_existing_output_only_with_overwrite_and_only_when_complete(setup, tmp_path, capsys):
    _, model = setup
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("an earlier result")
    assert main(["quantize", str(model), str(out)]) == 2
    assert f"{out} already exists; pass --overwrite to replace that folder" in _one_sentence(capsys)
    assert (out / "old.txt").read_text() == "an earlier result"
    assert main(["quantize", str(model), str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_merge_never_writes_into_the_folder_holding_its_adapter(finished, setup, tmp_path, capsys):
    _, model = setup
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = sorted(p.name for p in run.iterdir())
    assert main(["merge", str(model), str(run / "adapter"), str(run), "--overwrite"]) == 2
    assert f"{run} holds the adapter ({run / 'adapter'}); replacing it would delete what is being read" \
        in _one_sentence(capsys)
    assert sorted(p.name for p in run.iterdir()) == before


# --- a full disk --------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs at tmp_path/disk (root only), and `fill(leave)` to fill it up to `leave` bytes free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk is simulated on a small tmpfs, which cannot be mounted here "
                    f"({mounted.stderr.decode().strip() or 'mount failed'})")

    def fill(leave: int) -> None:
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - leave))

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill_at(monkeypatch, step: int, fill, leave, after: bool) -> None:
    """Fill the disk just before (or just after) the checkpoint of `step` is written."""
    real = state_mod.save_checkpoint

    def save(output_dir, at, model, *args, **kwargs):
        if at == step and not after:
            fill(leave(model))
        path = real(output_dir, at, model, *args, **kwargs)
        if at == step and after:
            fill(leave(model))
        return path

    monkeypatch.setattr(state_mod, "save_checkpoint", save)


def _adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_the_last_one_stays_intact(
        setup, small_disk, monkeypatch, capsys):
    root, model = setup
    disk, fill = small_disk
    out = disk / "run"
    recipe = _recipe_file(root, _raw(root, model, out, max_steps=6), "full")
    _fill_at(monkeypatch, 4, fill, lambda m: 64 * 1024, after=False)  # the metrics lines fit, a checkpoint does not
    assert main(["train", str(recipe), "--no-progress"]) == 2
    sentence = _one_sentence(capsys)
    assert sentence.startswith(f"error: no space left on device while writing {out / 'checkpoint-4'}: free ")
    assert sentence.endswith(" MB or choose another training.output_dir; the last checkpoint, step 2, is intact.")
    assert not list(out.glob(".*partial")) and not (out / "checkpoint-4").exists()
    assert state_mod.load_trainer_state(out / "checkpoint-2")["step"] == 2  # whole, and loads
    assert not (out / "nf4tune.lock").exists()
    # With space again, --resume continues from it.
    (disk / "filler").unlink()
    monkeypatch.undo()
    assert main(["train", str(recipe), "--resume", "--no-progress"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_at_the_final_checkpoint_still_keeps_the_trained_adapter(setup, small_disk, monkeypatch, caplog):
    """No checkpoint before the last step, and no room for the last one: the adapter (a third of a
    checkpoint) is written anyway, and the run is not lost."""
    root, model = setup
    disk, fill = small_disk
    out = disk / "run"
    _fill_at(monkeypatch, 4, fill, lambda m: _adapter_bytes(m) + 160 * 1024, after=False)
    caplog.set_level(logging.WARNING, logger="nf4tune")
    result = train(recipe_from_dict(_raw(root, model, out, save_steps=100)), progress=False)
    assert result.steps == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".*partial"))
    assert f"the final adapter is whole in {out / 'adapter'}, but the last checkpoint could not be written" in caplog.text
    import nf4tune

    nf4tune.load_model(model, device="cpu", adapter=out / "adapter")  # whole: it loads


def test_a_full_disk_at_the_final_adapter_keeps_the_final_checkpoint_and_resume_writes_it(
        setup, small_disk, monkeypatch, capsys):
    root, model = setup
    disk, fill = small_disk
    out = disk / "run"
    recipe = _recipe_file(root, _raw(root, model, out, save_total_limit=1), "final")
    _fill_at(monkeypatch, 4, fill, lambda m: 8 * 1024, after=True)
    assert main(["train", str(recipe), "--no-progress"]) == 2
    sentence = _one_sentence(capsys)
    assert sentence.startswith(f"error: no space left on device while writing {out / 'adapter'}: free ")
    assert sentence.endswith("the last checkpoint, step 4, is intact (--resume from it writes the adapter without "
                             "training again).")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # none pruned yet
    (disk / "filler").unlink()
    monkeypatch.undo()
    metrics = (out / "metrics.jsonl").read_text()
    assert main(["train", str(recipe), "--resume", "--no-progress"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "metrics.jsonl").read_text() == metrics  # no step trained again
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # pruned once the adapter is whole


def test_out_of_space_is_recognised_from_what_each_writer_says(tmp_path):
    from nf4tune.outputs import is_out_of_space

    assert is_out_of_space(OSError(28, "No space left on device"), tmp_path)
    assert is_out_of_space(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                           tmp_path)
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    torch_says.__context__ = RuntimeError("basic_ios::clear: iostream error")
    assert not is_out_of_space(torch_says, tmp_path)  # says nothing of space, and this disk has room
    assert not is_out_of_space(ValueError("bad value"), tmp_path)


# --- smaller inputs -----------------------------------------------------------------------------

def test_a_length_past_the_model_s_context_is_warned_about(setup, caplog):
    from nf4tune.train.inputs import _warn_past_context

    _, model = setup
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    caplog.set_level(logging.WARNING, logger="nf4tune")
    _warn_past_context(model, context - 8, 8)
    assert not caplog.text
    _warn_past_context(model, 4 * context, 8)
    assert (f"data.source_max_len + data.target_max_len = {4 * context} + 8 tokens, more than the {context}-token "
            f"context the model was made for") in caplog.text
    assert f"lower data.source_max_len to at most {context - 8}" in caplog.text


def test_a_full_disk_during_export_is_one_sentence_and_leaves_nothing(setup, small_disk, capsys):
    from nf4tune.checkpoint.tiny import byte_level_tokenizer

    root, _ = setup
    model = build_tiny_checkpoint(root / "bpe-model", tokenizer=byte_level_tokenizer())  # a tokenizer GGUF can carry
    disk, fill = small_disk
    out = disk / "model.gguf"
    fill(32 * 1024)  # room for the header and vocabulary, not for the tensors
    assert main(["export", str(model), str(out)]) == 2
    sentence = _one_sentence(capsys)
    free = shutil.disk_usage(disk).free
    assert sentence.startswith(f"error: no space left on device while writing {out}: free ")
    assert sentence.endswith(" MB or choose another output file; nothing was replaced.")
    asked = int(sentence.split(": free ")[1].split(" MB")[0]) * 1e6  # at least the base's size, less what is free
    assert asked >= sum(f.stat().st_size for f in model.glob("*.safetensors")) - free
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no partial file, no spool left behind
    (disk / "filler").unlink()
    assert main(["export", str(model), str(out)]) == 0 and out.is_file()  # with space, it writes
