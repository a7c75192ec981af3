"""Recipes: typed sections, overrides, and errors that name the key before anything loads."""

from pathlib import Path

import pytest

from nf4tune import Nf4tuneError
from nf4tune.cli.main import main
from nf4tune.train.config import load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MINIMAL = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "training": {"output_dir": "o"}}


def test_shipped_recipes_parse_and_follow_the_paper():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"demo", "alpaca", "guanaco-7b", "guanaco-13b", "guanaco-33b", "guanaco-65b"} <= names
    for size, dropout, lr in [("7b", 0.1, 2e-4), ("13b", 0.1, 2e-4), ("33b", 0.05, 1e-4), ("65b", 0.05, 1e-4)]:
        r = load_recipe(RECIPES / f"guanaco-{size}.yaml")
        assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.training.learning_rate) == (64, 16, dropout, lr)
        assert r.lora.target_modules == "all-linear" and r.training.lr_scheduler_type == "constant"
        assert r.training.warmup_ratio == 0.03 and r.training.max_grad_norm == 0.3 and r.training.max_steps == 1875
        assert r.training.per_device_train_batch_size * r.training.gradient_accumulation_steps == 16
        assert (r.data.source_max_len, r.data.target_max_len, r.data.group_by_length) == (16, 512, True)
        assert r.training.adam_beta2 == 0.999 and r.training.optim == "paged_adamw_32bit"
    demo = load_recipe(RECIPES / "demo.yaml")
    assert Path(demo.data.path).is_file() and Path(demo.eval.path).is_file()  # found beside the recipe


def test_overrides_are_typed_yaml_values():
    r = recipe_from_dict(MINIMAL, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                   "data.group_by_length=true", "training.max_steps=7"])
    assert r.training.learning_rate == 1e-4 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.group_by_length is True and r.training.max_steps == 7
    assert r.quant.quant_type == "nf4"  # defaults filled


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({**MINIMAL, "training": {"output_dir": "o", "learning_rte": 1}}, [],
         "unknown key training.learning_rte; did you mean 'learning_rate'"),
        (MINIMAL, ["trainig.max_steps=3"], "unknown recipe section 'trainig'; did you mean 'training'"),
        (MINIMAL, ["training.max_steps=ten"], "training.max_steps must be an integer, got 'ten'"),
        (MINIMAL, ["data.train_on_source=maybe"], "data.train_on_source must be true or false"),
        ({**MINIMAL, "model": {}}, [], "the recipe must set model.name_or_path"),
        ({"model": {"name_or_path": "m"}, "data": {"path": "d"}}, [], "no 'training' section"),
        (MINIMAL, ["lora.r=0"], "recipe section 'lora': LoRA rank r must be a positive integer, got 0"),
        (MINIMAL, ["lora.dropout=1.5"], "recipe section 'lora': LoRA dropout must be in"),
        (MINIMAL, ["training.optim=sgd"], "training.optim is 'sgd'; use one of paged_adamw_32bit, paged_adamw_8bit, adamw_torch"),
        (MINIMAL, ["training.lr_scheduler_type=step"], "use one of constant, linear, cosine"),
        (MINIMAL, ["training.max_steps"], "is not key=value"),
    ],
)
def test_bad_recipes_name_the_key(raw, overrides, message):
    with pytest.raises(Nf4tuneError, match=message.replace("[", r"\[").replace("(", r"\(")):
        recipe_from_dict(raw, overrides)


def test_print_config_shows_the_resolved_recipe(capsys):
    assert main(["train", str(RECIPES / "guanaco-7b.yaml"), "training.learning_rate=5e-5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 5.0e-05" in out and "name_or_path:" in out and "r: 64" in out
    assert main(["train", str(RECIPES / "demo.yaml"), "training.nope=1"]) == 2
    assert "unknown key training.nope" in capsys.readouterr().err
