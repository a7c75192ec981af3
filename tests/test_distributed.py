"""Training in several processes (torchrun, gloo on CPU): DDP and FSDP2 reproduce one process's losses
and adapter for the same global batch, FSDP holds about half the bytes per rank, a checkpoint resumes
at the same and at another world size, and a failure on one rank stops the whole run with a sentence."""

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

# Packed rows (several examples each) drawn in length groups: each rank must still take its slice.
PACKED = {"packing": True, "group_by_length": True, "source_max_len": 64}

# Every run of one launch shares a process group, so torch and the model code are imported once.
DRIVER = f"PACKED = {PACKED!r}\n" + """
import json, logging, sys
from pathlib import Path
import torch, torch.distributed as dist
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train

logging.basicConfig(level=logging.INFO, format="%(message)s")  # rank 0's log lines, as the CLI shows them
root, backend = Path(sys.argv[1]), sys.argv[2]
raw = json.loads((root / "recipe.json").read_text())
if backend == "nccl":
    raw["model"]["device"] = "cuda"
    torch.cuda.set_device(int(__import__("os").environ["LOCAL_RANK"]))
dist.init_process_group(backend)
if dist.get_rank() == 1:  # a slow rank 1, as under load: rank 0 must not move a checkpoint before its files are in
    import time
    save = torch.save
    def slow_save(obj, f, *args, **kwargs):
        if "rng-rank" in str(f):
            time.sleep(0.5)
        return save(obj, f, *args, **kwargs)
    torch.save = slow_save

def run(out, resume=None, model=None, data=None, **training):
    t = {**raw["training"], "output_dir": str(root / out), "gradient_accumulation_steps": 1, **training}
    m = {**raw["model"], "name_or_path": model or raw["model"]["name_or_path"]}
    d = {**raw["data"], **(data or {})}
    train(recipe_from_dict({**raw, "model": m, "data": d, "training": t}), resume=resume, progress=False)

run("ddp", parallel="ddp")
run("fsdp", parallel="fsdp")
if backend == "nccl":
    run("fsdp_offload", parallel="fsdp", fsdp_cpu_offload=True)  # shards in host memory between uses
if backend == "gloo":
    # same world size; fsdp_cpu_offload is accepted on CPU (shards are in host memory already)
    run("fsdp_resumed", resume=str(root / "fsdp" / "checkpoint-3"), parallel="fsdp", fsdp_cpu_offload=True)
    run("one_to_two", resume=str(root / "one" / "checkpoint-3"), parallel="fsdp")  # 1 -> 2
    run("fsdp_packed", parallel="fsdp", data=PACKED, max_steps=3)
    for strategy in ("ddp", "fsdp"):  # 8 layers: what a rank holds while loading
        run(f"deep_{strategy}", model=str(root / "deep"), parallel=strategy, max_steps=1)
dist.destroy_process_group()
"""

# Rank 1 reads a file with a bad row; rank 0 reads a good one and goes on to the first collective.
FAULT_DRIVER = """
import os, sys
from nf4tune.cli.main import main
recipe, good, bad = sys.argv[1:4]
data = bad if os.environ["RANK"] == "1" else good
sys.exit(main(["train", recipe, f"data.path={data}", "training.parallel=ddp", "--no-progress"]))
"""

# Rank 1 raises an ordinary exception in its third step, after checkpoint-2 is written.
EXCEPTION_DRIVER = """
import os, sys
from nf4tune.cli.main import main
from nf4tune.train import loop
if os.environ["RANK"] == "1":
    step = loop.Trainer.train_step
    def failing(self):
        if self.state.step == 2:
            raise RuntimeError("injected fault")
        return step(self)
    loop.Trainer.train_step = failing
sys.exit(main(["train", sys.argv[1], "training.parallel=ddp", "training.gradient_accumulation_steps=1",
               "training.save_steps=2", "--no-progress"]))
"""

# On the first attempt rank 1 is killed in its fifth step (after checkpoint-3); torchrun restarts both.
ELASTIC_DRIVER = """
import os, signal, sys
from nf4tune.cli.main import main
from nf4tune.train import loop
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    step = loop.Trainer.train_step
    def dying(self):
        if self.state.step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self)
    loop.Trainer.train_step = dying
sys.exit(main(["train", sys.argv[1], "training.parallel=ddp", "training.gradient_accumulation_steps=1", "--no-progress"]))
"""


def _raw(root: Path, model: Path) -> dict:
    return {
        "model": {"name_or_path": str(model), "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},  # dropout masks depend on each rank's RNG
        "data": {"path": str(root / "train.jsonl"), "source_max_len": 32, "target_max_len": 8},
        # 7 held-out rows in batches of 3: 3 batches, so under 2 ranks one rank pads with a discarded forward
        "eval": {"path": str(root / "eval.jsonl"), "per_device_eval_batch_size": 3},
        "training": {"output_dir": str(root / "one"), "max_steps": 6, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 2, "learning_rate": 2e-3, "lr_scheduler_type": "cosine",
                     "warmup_steps": 2, "logging_steps": 1, "save_steps": 3, "eval_steps": 3, "seed": 3},
    }


def _torchrun(script: Path, *args, timeout: float = 240, restarts: int = 0) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           f"--max-restarts={restarts}", str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return done, time.time() - start


def _rank_errors(stderr: str) -> str:
    """The ranks' own lines of a failed launch (torchrun's summary hides which rank failed first)."""
    return "\n".join(line for line in stderr.splitlines() if line.startswith("[rank"))[-4000:] or stderr[-4000:]


def _losses(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _assert_same_losses(got: dict, want: dict, steps) -> None:
    assert sorted(got) == list(steps), got
    for step in steps:
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """One process (global batch 8 = 4 x 2 accumulation), then one two-process launch (4 x 1 x 2 ranks)."""
    root = tmp_path_factory.mktemp("dist")
    model = tiny_model
    build_tiny_checkpoint(root / "deep", num_hidden_layers=8)
    _write_rows(root / "train.jsonl", range(100, 260))
    _write_rows(root / "eval.jsonl", range(300, 307))  # 7: does not divide by 2 ranks
    raw = _raw(root, model)
    (root / "recipe.json").write_text(json.dumps(raw))
    with _log_lines() as lines:
        train(recipe_from_dict(raw), progress=False)
    (root / "one.log").write_text("\n".join(lines))
    packed = {**raw, "data": {**raw["data"], **PACKED},
              "training": {**raw["training"], "output_dir": str(root / "one_packed"), "max_steps": 3}}
    with _log_lines() as lines:
        train(recipe_from_dict(packed), progress=False)
    [(examples, rows)] = [map(int, m.groups()) for line in lines
                          if (m := re.match(r"nf4tune: (\d+) examples packed into (\d+) rows", line))]
    assert rows < examples  # several examples share a row
    (root / "driver.py").write_text(DRIVER)
    done, _ = _torchrun(root / "driver.py", root, "gloo")
    assert done.returncode == 0, _rank_errors(done.stderr)
    (root / "launch.log").write_text(done.stderr)
    return root, raw


def _write_rows(path: Path, numbers) -> None:
    rows = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in numbers]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def _log_lines():
    """The nf4tune logger's messages while the block runs."""
    lines, logger = [], logging.getLogger("nf4tune")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _trainable_counts(text: str) -> list[str]:
    return re.findall(r"trainable parameters ([\d,]+ of [\d,]+ \([\d.]+%\))", text)


def test_every_strategy_logs_one_process_parameter_counts(runs):
    root, _ = runs
    [one] = _trainable_counts((root / "one.log").read_text())
    # rank 0 alone logs: ddp, fsdp, fsdp resumed, 1 -> 2, packed (this model), then the 8-layer model by ddp and fsdp
    launched = _trainable_counts((root / "launch.log").read_text())
    assert launched[:5] == [one] * 5, (one, launched)
    assert launched[5] == launched[6] != one, launched


def test_packed_rows_in_length_groups_split_over_ranks_as_one_process(runs):
    root, _ = runs
    _assert_same_losses(_losses(root / "fsdp_packed"), _losses(root / "one_packed"), range(1, 4))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_losses_and_adapter_of_one_process(runs, strategy):
    root, _ = runs
    one = _losses(root / "one")
    assert len(set(one.values())) == 6  # it trains
    _assert_same_losses(_losses(root / strategy), one, range(1, 7))
    want = load_file(root / "one" / "adapter" / "adapter_model.safetensors")
    got = load_file(root / strategy / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-7), key
    assert json.loads((root / strategy / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    summary = json.loads((root / strategy / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    # Each rank evaluated its share of the 7 held-out rows (one padding forward under FSDP); the
    # all-reduced sums give one process's eval loss.
    want_eval = _losses(root / "one", "eval_loss")
    assert sorted(want_eval) == [3, 6] and want_eval[3] != want_eval[6]
    _assert_same_losses(_losses(root / strategy, "eval_loss"), want_eval, [3, 6])


def test_eval_batches_deal_one_process_s_batches_to_the_ranks_with_equal_forward_counts():
    from nf4tune.train.evaluation import eval_batches

    for count, size, world in ((7, 3, 2), (10, 2, 4), (1, 4, 3), (12, 4, 3)):
        one = eval_batches(count, size)
        shares = [eval_batches(count, size, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # every rank calls forward as often (FSDP collectives)
        dealt = sorted((r for share in shares for r in share if r is not None), key=lambda r: r.start)
        assert dealt == one and [i for r in dealt for i in r] == list(range(count))  # disjoint, all of them


def test_fsdp_holds_half_the_bytes_per_rank(runs):
    root, _ = runs
    summaries = {name: json.loads((root / name / "summary.json").read_text()) for name in ("one", "ddp", "fsdp")}
    assert (summaries["one"]["world_size"], summaries["one"]["strategy"]) == (1, "single")  # one process reports too
    bytes_of = {name: summary["param_bytes_per_rank"] for name, summary in summaries.items()}
    assert bytes_of["ddp"] == bytes_of["one"]  # replicated
    assert 0.45 < bytes_of["fsdp"] / bytes_of["one"] < 0.56, bytes_of  # packed 4-bit bytes sharded too


def test_fsdp_ranks_never_hold_every_layer_while_loading(runs):
    root, _ = runs
    summary = {name: json.loads((root / name / "summary.json").read_text()) for name in ("deep_ddp", "deep_fsdp")}
    whole = summary["deep_ddp"]["param_bytes_per_rank"]  # a replica: the whole model
    assert summary["deep_ddp"]["load_peak_param_bytes_per_rank"] == whole
    # Each layer is sharded as soon as it is read: a rank holds its halves of the layers, the layer
    # being read, and the embeddings and head until the root unit is sharded.
    peak = summary["deep_fsdp"]["load_peak_param_bytes_per_rank"]
    assert summary["deep_fsdp"]["param_bytes_per_rank"] < peak < 0.7 * whole, (peak, whole)


def test_resume_at_the_same_and_at_another_world_size(runs, caplog):
    root, raw = runs
    uninterrupted = _losses(root / "one")
    _assert_same_losses(_losses(root / "fsdp_resumed"), _losses(root / "fsdp"), range(4, 7))  # 2 -> 2
    _assert_same_losses(_losses(root / "one_to_two"), uninterrupted, range(4, 7))  # 1 -> 2
    assert "global batch of" not in (root / "launch.log").read_text()  # every resume there kept it
    # 2 -> 1: the sharded optimizer state read back by one process
    caplog.set_level("WARNING", logger="nf4tune")
    recipe = recipe_from_dict({**raw, "training": {**raw["training"], "output_dir": str(root / "two_to_one")}})
    train(recipe, resume=root / "fsdp" / "checkpoint-3", progress=False)
    _assert_same_losses(_losses(root / "two_to_one"), uninterrupted, range(4, 7))
    assert "global batch" not in caplog.text
    # 2 -> 1 without the accumulation that keeps the global batch: trains on, and says what differs
    halved = {**raw["training"], "output_dir": str(root / "halved"), "gradient_accumulation_steps": 1, "max_steps": 4}
    train(recipe_from_dict({**raw, "training": halved}), resume=root / "fsdp" / "checkpoint-3", progress=False)
    assert ("the checkpoint was trained with a global batch of 8 and this run's is 4 (4 per device x 1 accumulation "
            "x 1 rank(s)): the losses will differ from an uninterrupted run's; "
            "training.gradient_accumulation_steps=2 keeps it") in caplog.text


def test_a_bad_row_on_one_rank_stops_every_rank_with_a_sentence(runs):
    import yaml

    root, raw = runs
    (root / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    faulty = {**raw, "training": {**raw["training"], "output_dir": str(root / "fault")}}
    (root / "fault.yaml").write_text(yaml.safe_dump(faulty))
    (root / "fault_driver.py").write_text(FAULT_DRIVER)
    done, seconds = _torchrun(root / "fault_driver.py", root / "fault.yaml", root / "train.jsonl", root / "bad.jsonl",
                              timeout=120)
    assert done.returncode != 0 and seconds < 60, (done.returncode, seconds)
    assert "error: rank 1 of 2: " in done.stderr and "bad.jsonl, row 2: field 'completion' is missing" in done.stderr


def _recipe_file(root: Path, raw: dict, name: str) -> Path:
    import yaml

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "training": {**raw["training"], "output_dir": str(root / name)}}))
    return path


def test_an_exception_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(runs):
    from nf4tune.train.rundir import latest_checkpoint_of_run

    root, raw = runs
    (root / "exception_driver.py").write_text(EXCEPTION_DRIVER)
    done, seconds = _torchrun(root / "exception_driver.py", _recipe_file(root, raw, "exception"), timeout=120)
    assert done.returncode != 0 and seconds < 60, (done.returncode, seconds)
    assert "error: rank 1 of 2 failed: RuntimeError: injected fault" in done.stderr, _rank_errors(done.stderr)
    latest = latest_checkpoint_of_run(root / "exception")
    assert latest == root / "exception" / "checkpoint-2"
    assert (latest / "adapter_model.safetensors").is_file() and (latest / "rng-rank1.pt").is_file()


@pytest.mark.slow  # two launches of two ranks (the restart included): about 40 s on 2 cores
def test_a_killed_rank_restarted_by_torchrun_resumes_from_the_last_checkpoint(runs):
    root, raw = runs
    (root / "elastic_driver.py").write_text(ELASTIC_DRIVER)
    done, _ = _torchrun(root / "elastic_driver.py", _recipe_file(root, raw, "elastic"), restarts=1)
    assert done.returncode == 0, _rank_errors(done.stderr)
    assert "resuming from the last complete checkpoint" in done.stderr
    _assert_same_losses(_losses(root / "elastic"), _losses(root / "ddp"), range(1, 7))  # as if never killed


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_two_gpus_on_nccl(runs):
    root, _ = runs
    done, _ = _torchrun(root / "driver.py", root, "nccl")
    assert done.returncode == 0, _rank_errors(done.stderr)
    for strategy in ("ddp", "fsdp"):
        assert len(_losses(root / strategy)) == 6
    fsdp, offload = _losses(root / "fsdp"), _losses(root / "fsdp_offload")
    assert sorted(offload) == sorted(fsdp), offload
    for step, loss in offload.items():
        assert math.isclose(loss, fsdp[step], rel_tol=1e-4), (step, loss, fsdp[step])


def test_auto_picks_ddp_when_a_replica_fits_and_estimate_shares_the_formulas(runs, capsys):
    from nf4tune.cli.main import main
    from nf4tune.plan.estimate import GIB, estimate, pick_strategy
    from nf4tune.train.parallel import plan_arguments

    root, raw = runs
    plan = plan_arguments(recipe_from_dict(raw))
    model = raw["model"]["name_or_path"]
    ddp, fsdp = (estimate(model, gpus=2, strategy=s, **plan) for s in ("ddp", "fsdp"))
    assert ddp.weights_4bit == estimate(model, gpus=1, **plan).weights_4bit == 2 * fsdp.weights_4bit
    assert ddp.activations == fsdp.activations  # activations stay per rank
    assert pick_strategy(model, 80 * GIB, 2, **plan)[0] == "ddp"
    strategy, why = pick_strategy(model, ddp.total_without_paged_states, 2, **plan)  # no headroom left
    assert strategy == "fsdp" and "over 90%" in why
    # The estimate's parameter bytes per rank are what the runs held (summary.json's, read from the model):
    # the recipe's compute_dtype (float32) sizes the embeddings, norms and head.
    assert plan["compute_dtype"] == "float32"
    for run, est in (("one", estimate(model, gpus=1, **plan)), ("ddp", ddp), ("fsdp", fsdp)):
        held = json.loads((root / run / "summary.json").read_text())["param_bytes_per_rank"]
        assert math.isclose(est.weights_4bit + est.quant_constants + est.weights_16bit + est.lora, held,
                            rel_tol=0.01), (run, est, held)
    assert main(["estimate", model, "--gpus", "2", "--strategy", "fsdp", "--seq-len", "40", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "FSDP, per GPU" in out and "training.parallel=auto picks DDP on 2 x 80 GB" in out


class _OneRankOfTwo:
    """What `exact_match` asks of a Parallel, as rank `rank` of 2; `sums` keeps this rank's own values."""

    def __init__(self, rank: int):
        self.rank, self.world_size, self.summed = rank, 2, None

    def sums(self, values):
        self.summed = values
        return values


def test_exact_match_over_two_ranks_counts_one_process_s_hits(tiny_model):
    """Held-out rows whose targets are the model's own greedy replies (4 of 7; 3 changed): the ranks'
    shares are disjoint, cover the 7 rows, and their hits add up to one process's 4."""
    import nf4tune
    from nf4tune.evaluate.exact_match import _greedy, end_of_turn_ids
    from nf4tune.train.data import IGNORE_INDEX, Tokenized
    from nf4tune.train.evaluation import exact_match

    model, tok = nf4tune.load_model(tiny_model, compute_dtype=torch.float32, device="cpu", progress=False)
    stop = end_of_turn_ids(tok, model)
    prompts = [tok(f"Is {10 ** n} odd? ").input_ids for n in range(7)]  # longer and longer
    replies = []
    for start in range(0, 7, 3):  # the batches exact_match makes (prompts by length, 3 at a time), left-padded
        batch = prompts[start:start + 3]
        width = max(map(len, batch))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(q)) + q for q in batch])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in batch])
        replies += [reply[:2] for reply in _greedy(model, ids, mask, 2, stop, tok.pad_token_id)]
    rows = []
    for n, (prompt, reply) in enumerate(zip(prompts, replies)):
        if n % 2:
            reply = [reply[0] + 1] + reply[1:]  # not the model's reply
        rows.append(Tokenized(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
    ranks = [_OneRankOfTwo(rank) for rank in range(2)]
    for rank in ranks:
        exact_match(model, tok, rows, batch_size=3, par=rank)
    hits, counts = (sum(rank.summed[i] for rank in ranks) for i in range(2))
    assert (hits, counts) == (4, 7) and all(rank.summed[1] > 0 for rank in ranks)


def test_nproc_starts_torchrun_with_the_same_arguments():
    from nf4tune.cli.main import build_parser
    from nf4tune.cli.train import torchrun_command

    args = build_parser().parse_args(["train", "r.yaml", "training.max_steps=5", "--nproc", "4", "--resume", "--no-progress"])
    command = torchrun_command(args)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert command[5:] == ["-m", "nf4tune", "train", "r.yaml", "training.max_steps=5", "--resume", "--no-progress"]


def _fake_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint folder as `latest_checkpoint_of_run` recognises one (complete, no run id)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.pt").write_bytes(b"")
    return path


def test_a_restarted_attempt_resumes_from_the_run_s_last_checkpoint_or_starts_again(tmp_path, monkeypatch, caplog):
    from nf4tune.train import parallel

    def decide(recipe, resume):  # a fresh process of the restarted attempt
        monkeypatch.setattr(parallel, "_restarts_noted", set())
        return parallel.resume_after_restart(recipe, resume)

    out = tmp_path / "run"
    out.mkdir()
    recipe = recipe_from_dict(_raw(tmp_path, tmp_path / "model") | {"training": {"output_dir": str(out)}})
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first attempt: as the user said
    assert decide(recipe, None) == (recipe, None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    caplog.set_level("WARNING", logger="nf4tune")
    # No checkpoint yet: from step 0 (the earlier attempt's folder moved aside), or from the user's checkpoint again.
    again, resume = decide(recipe, None)
    assert resume is None and again.training.overwrite_output_dir and not recipe.training.overwrite_output_dir
    assert parallel.resume_after_restart(again, resume) == (again, None)  # asked again (CLI, then train): said once
    assert caplog.text.count("restart 2 of the ranks: no checkpoint of this run yet, starting again from step 0") == 1
    given = tmp_path / "other" / "checkpoint-3"
    assert decide(recipe, str(given)) == (recipe, str(given))
    assert f"resuming again from {given}" in caplog.text
    # A checkpoint written by an earlier attempt: resumed, whatever the first attempt was told.
    _fake_checkpoint(out, 4)
    assert decide(recipe, None) == (recipe, True)
    assert decide(recipe, str(given)) == (recipe, True)
    assert f"resuming from the last complete checkpoint, {out / 'checkpoint-4'}" in caplog.text


def test_a_restart_before_the_first_checkpoint_trains_from_step_0(tmp_path, tiny_model, monkeypatch, caplog):
    """What a first attempt killed in its first step leaves (run.json, an empty metrics.jsonl) is
    moved aside, and the restarted attempt (`nf4tune train`, as torchrun starts it) trains from step 0
    instead of refusing the folder."""
    from nf4tune.cli.main import main
    from nf4tune.train import rundir

    raw = _raw(tmp_path, tiny_model)
    del raw["eval"]  # no held-out file here
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"{n}? ", "completion": "even"}) + "\n"
                                                  for n in range(16)))
    raw["training"].update(max_steps=2, save_steps=10, gradient_accumulation_steps=1)
    out = tmp_path / "one"
    out.mkdir()
    rundir.start_run(out)
    (out / "metrics.jsonl").write_text("")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr("nf4tune.train.parallel._restarts_noted", set())
    caplog.set_level("INFO", logger="nf4tune")
    assert main(["train", str(_recipe_file(tmp_path, raw, "one")), "--no-progress"]) == 0
    assert caplog.text.count("restart 1 of the ranks: no checkpoint of this run yet, starting again from step 0") == 1
    assert sorted(_losses(out)) == [1, 2]
    [aside] = tmp_path.glob("one.old-*")
    assert (aside / "run.json").is_file()


def test_auto_on_cpu_sizes_a_cpu_run_against_this_rank_s_share_of_host_memory(tmp_path, tiny_model, monkeypatch):
    from nf4tune.plan.estimate import GIB, estimate
    from nf4tune.train.parallel import Parallel, plan_arguments

    model = tiny_model
    recipe = recipe_from_dict(_raw(tmp_path, model) | {"model": {"name_or_path": str(model), "device": "cpu"}})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this host share its memory
    strategy, why = Parallel(0, 2, parallel="auto")._choose(recipe, model)
    need = estimate(str(model), gpus=2, strategy="ddp", device="cpu", **plan_arguments(recipe)).total_without_paged_states
    share = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert strategy == "ddp"
    assert why == f"a replica needs {need / GIB:.2f} GiB, within 90% of {share / GIB:.1f} GiB per device"
