"""The training loop: exact resume, NaN guards, new tokens, outputs, and the offline demo."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune import Nf4tuneError
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.train import loop as loop_mod
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = build_tiny_checkpoint(root / "model")
    rows = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in range(100, 260)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model


def _recipe(root, model, out, **training):
    raw = {
        "model": {"name_or_path": str(model)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"path": str(root / "train.jsonl"), "source_max_len": 32, "target_max_len": 8},
        "eval": {"size": 16, "per_device_eval_batch_size": 8},
        "training": {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 2, "learning_rate": 2e-3, "lr_scheduler_type": "cosine",
                     "warmup_steps": 2, "logging_steps": 1, "save_steps": 3, "eval_steps": 3, "seed": 3, **training},
    }
    return recipe_from_dict(raw)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_losses_of_an_uninterrupted_run(setup):
    root, model = setup
    out = root / "run"
    train(_recipe(root, model, out), progress=False)
    uninterrupted = {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}
    assert len(uninterrupted) == 6 and len(set(uninterrupted.values())) == 6

    # Pretend the run died after checkpoint-3: drop what came later, then resume.
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "adapter")
    result = train(_recipe(root, model, out), resume=True, progress=False)
    resumed = {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}
    assert resumed == uninterrupted  # steps 4-6 recomputed from the checkpoint, exactly
    assert result.steps == 6 and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_outputs_metrics_plot_checkpoints_and_summary(setup, capsys):
    root, model = setup
    out = root / "outputs"
    recipe = _recipe(root, model, out, max_steps=9, save_total_limit=1)
    result = train(recipe, progress=False)
    records = _metrics(out)
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 10))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm", "peak_memory_gib"} <= r.keys() for r in logged)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9]
    assert all(math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"])) for r in evals)
    assert result.best_eval_loss == min(r["eval_loss"] for r in evals)
    assert logged[0]["lr"] == 0.0 and logged[2]["lr"] == pytest.approx(2e-3)  # warmup, then the peak
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert "checkpoint-9" in kept and result.best_checkpoint.name in kept and len(kept) <= 2  # newest + best
    assert not list(out.glob(".*partial"))
    # The final adapter is a PEFT-format adapter that loads back.
    trained, _ = nf4tune.load_model(model, device="cpu", adapter=result.adapter_dir)
    assert len(nf4tune.layers.lora_layers(trained)) == 14


def test_nan_steps_are_skipped_and_a_run_of_them_stops_with_the_cause(setup, monkeypatch):
    root, model = setup
    real = loop_mod.loss_sum
    calls = {"n": 0}

    def sometimes_nan(model, batch, chunk):
        calls["n"] += 1
        s, n = real(model, batch, chunk)
        return (s * float("nan"), n) if calls["n"] in (3, 4) else (s, n)  # step 2 (micro-batches 3, 4)

    monkeypatch.setattr(loop_mod, "loss_sum", sometimes_nan)
    result = train(_recipe(root, model, root / "nan1", max_steps=4), progress=False)
    assert result.skipped_steps == 1 and result.steps == 4

    monkeypatch.setattr(loop_mod, "loss_sum", lambda m, b, c: (real(m, b, c)[0] * float("inf"), 1))
    with pytest.raises(Nf4tuneError, match="NaN/Inf for 5 steps in a row.*learning rate.*No checkpoint"):
        train(_recipe(root, model, root / "nan2", max_steps=8), progress=False)


def test_new_tokens_train_their_rows_and_travel_with_the_adapter(setup):
    root, model = setup
    out = root / "tokens"
    recipe = _recipe(root, model, out, max_steps=4)
    recipe.model.add_special_tokens = ["<|answer|>"]
    recipe.model.add_tokens = ["even", "odd"]
    before, _ = nf4tune.load_model(model, device="cpu")
    old = before.get_input_embeddings().weight.float()
    result = train(recipe, progress=False)

    loaded, tok = nf4tune.load_model(model, device="cpu", adapter=result.adapter_dir)
    emb = loaded.get_input_embeddings().weight.float()
    assert emb.shape[0] == old.shape[0] + 3 and len(tok) == emb.shape[0]
    assert tok.convert_tokens_to_ids("<|answer|>") == old.shape[0] + 2
    assert torch.equal(emb[: old.shape[0]], old)  # old rows untouched
    assert not torch.allclose(emb[old.shape[0]:], old.mean(0).expand(3, -1), atol=1e-6)  # new rows trained
    head = loaded.get_output_embeddings().weight
    assert head.shape[0] == emb.shape[0]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    rows = list(range(old.shape[0], old.shape[0] + 3))
    assert config["trainable_token_indices"] == {"embed_tokens": rows, "lm_head": rows}  # only the new rows saved


@pytest.mark.slow
def test_the_readme_demo_learns_the_skill(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NF4TUNE_CACHE", str(tmp_path / "cache"))
    assert main(["train", str(ROOT / "recipes" / "demo.yaml"), f"training.output_dir={tmp_path / 'demo'}",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    em = json.loads((tmp_path / "demo" / "summary.json").read_text())["exact_match"]
    assert em["before"] <= 0.1 and em["after"] >= 0.9, em
    assert f"{em['before']:.1%} before -> {em['after']:.1%} after" in out and "adapter:" in out


def test_packing_keeps_examples_apart(setup):
    from nf4tune.models.loss import loss_sum
    from nf4tune.train.data import collate, load_examples, pack

    root, model_dir = setup
    model, tok = nf4tune.load_model(model_dir, device="cpu", compute_dtype=torch.float32)
    examples, _ = load_examples(str(root / "train.jsonl"), "train", "auto", tok, 32, 8, False, max_samples=12)
    rows = pack(examples, 64, seed=0)
    assert len(rows) < len(examples) and sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)
    # A packed example computes what it computes alone; without the boundaries it would not.
    a, b = examples[0], examples[1]
    packed = collate(pack([a, b], 64, seed=0), tok.pad_token_id)
    first = packed["position_ids"][0].tolist().index(0, 1)  # where the second example starts
    second = packed["input_ids"][0, first:]
    with torch.no_grad():
        alone = model.model(input_ids=second[None], use_cache=False).last_hidden_state[0]
        inside = model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                             use_cache=False).last_hidden_state[0, first:]
        leaky = model.model(input_ids=packed["input_ids"], use_cache=False).last_hidden_state[0, first:]
        assert (inside - alone).abs().max() < 1e-4 < (leaky - alone).abs().max()
        total, count = loss_sum(model, collate(rows, tok.pad_token_id))
        separate = [loss_sum(model, collate([e], tok.pad_token_id)) for e in examples]
    assert count == sum(n for _, n in separate)
    assert torch.allclose(total, sum(s for s, _ in separate), rtol=1e-5)

    recipe = _recipe(root, model_dir, root / "packed", max_steps=3, save_steps=3)
    recipe.data.packing = True
    result = train(recipe, progress=False)
    assert result.steps == 3 and math.isfinite(result.final_loss)


def test_a_bad_row_is_reported_before_the_model_loads(setup, tmp_path, monkeypatch):
    root, model = setup
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    recipe = _recipe(root, model, tmp_path / "out")
    recipe.data.path = str(tmp_path / "bad.jsonl")
    monkeypatch.setattr(loop_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    with pytest.raises(Nf4tuneError, match=r"bad.jsonl, row 2: field 'completion' is missing"):
        train(recipe, progress=False)


@pytest.mark.parametrize("compile_kernels", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_has_the_gradients_of_the_full_logits_loss(setup, monkeypatch, compile_kernels):
    from nf4tune import dispatch
    from nf4tune.kernels import compiled
    from nf4tune.models.loss import loss_sum
    from nf4tune.train.data import collate, load_examples
    from nf4tune.train.tokens import train_new_rows

    root, model_dir = setup
    model, tok = nf4tune.load_model(model_dir, device="cpu", compute_dtype=torch.float32,
                                    lora=nf4tune.LoraConfig(r=4, dropout=0.0))
    for layer in nf4tune.layers.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    train_new_rows(model, first_new=90)  # the head trains too, as with new tokens
    examples, _ = load_examples(str(root / "train.jsonl"), "train", "auto", tok, 32, 8, False, max_samples=6)
    batch = collate(examples, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    if compile_kernels:  # tiny inputs normally stay eager; force the compiled kernels
        monkeypatch.setattr(dispatch, "COMPILE_MIN_NUMEL", 0)
        monkeypatch.setattr(compiled, "broken", False)

    total, count = loss_sum(model, batch, chunk_tokens=5)  # several chunks
    chunked = torch.autograd.grad(total / count, params)
    reference = model(**batch, use_cache=False).loss  # transformers' full-logits mean loss
    full = torch.autograd.grad(reference, params)
    assert torch.allclose(total / count, reference, rtol=1e-5)
    for a, b in zip(chunked, full):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert chunked[-1].abs().sum() > 0  # the head's gradient is there, on the new rows only
    assert not compiled.broken, "the compiled loss fell back to the reference"


def test_float16_compute_trains_with_loss_scaling(setup):
    root, model = setup
    recipe = _recipe(root, model, root / "fp16", max_steps=3, save_steps=3)
    recipe.model.compute_dtype = "float16"
    result = train(recipe, progress=False)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    state = torch.load(result.output_dir / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0  # the loss scaler ran and is saved


def test_recipe_benchmarks_are_scored_logged_and_summarized(setup):
    from nf4tune.evaluate.benchmarks import parse_benchmarks, run_benchmarks

    root, model = setup
    out = root / "bench"
    bench = {"task": "multiple_choice", "data": str(ROOT / "tests" / "data" / "mmlu_test.jsonl"), "shots": 0, "name": "mc"}
    recipe = _recipe(root, model, out, max_steps=3, save_steps=3, eval_steps=3)
    recipe.eval.benchmarks = [bench]
    result = train(recipe, progress=False)
    logged = [r for r in _metrics(out) if "mc_accuracy" in r]
    assert [r["step"] for r in logged] == [3]
    summary = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert summary == result.benchmarks and set(summary) == {"before", "after"}
    # the summary's "after" is the trained adapter's score, as a direct evaluation of it gives
    trained, tok = nf4tune.load_model(model, adapter=result.adapter_dir, device="cpu")
    assert summary["after"]["mc_accuracy"] == run_benchmarks(trained, tok, parse_benchmarks([bench]))["mc_accuracy"]
    assert logged[0]["mc_accuracy"] == summary["after"]["mc_accuracy"]
