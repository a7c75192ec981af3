"""A mixture-of-experts model (a tiny random Qwen3-MoE, its fused experts in 4-bit with per-expert LoRA)
trained by two ranks (torchrun, gloo on CPU) under DDP and FSDP2: the losses and the saved adapter,
expert adapters included, are one process's, and FSDP shards the experts' 4-bit storage over the ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _assert_same_losses, _losses, _rank_errors, _raw, _torchrun, _write_rows  # noqa: E402

from nf4tune.checkpoint.tiny import build_tiny_checkpoint  # noqa: E402
from nf4tune.train.config import recipe_from_dict  # noqa: E402
from nf4tune.train.loop import train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

STEPS = 3

# One launch for both strategies. Each rank's `summary.json` gains `expert_bytes_per_rank`: the bytes of
# the experts' 4-bit storage (codes, absmax, nested absmax) this rank holds, the largest over the ranks.
MOE_DRIVER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from nf4tune.layers.experts4bit import ExpertWeight4bit
from nf4tune.train import parallel
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train

layout = parallel.Parallel.layout

def with_expert_bytes(self, model):
    module = self.root if self.root is not None else model
    held = 0
    for weight in module.modules():
        if isinstance(weight, ExpertWeight4bit):
            for name in ("packed", "absmax", "nested_absmax"):
                t = getattr(weight, name)
                t = t.to_local() if hasattr(t, "to_local") else t
                held += 0 if t is None else t.numel() * t.element_size()
    return {**layout(self, model), "expert_bytes_per_rank": int(self.max(float(held)))}

parallel.Parallel.layout = with_expert_bytes
root = Path(sys.argv[1])
raw = json.loads((root / "recipe.json").read_text())
dist.init_process_group("gloo")
def run(out, strategy, resume=None):
    t = {**raw["training"], "output_dir": str(root / out), "gradient_accumulation_steps": 1, "parallel": strategy}
    train(recipe_from_dict({**raw, "training": t}), resume=resume, progress=False)

run("ddp", "ddp")
run("fsdp", "fsdp")
# resumed at step 2: one process's checkpoint under FSDP (the adapter restored as each layer is sharded),
# FSDP's sharded checkpoint under DDP
run("fsdp_from_one", "fsdp", resume=str(root / "one" / "checkpoint-2"))
run("ddp_from_fsdp", "ddp", resume=str(root / "fsdp" / "checkpoint-2"))
dist.destroy_process_group()
"""


def _expert_storage_bytes(model) -> int:
    from nf4tune.layers.experts4bit import expert_weights

    return sum(t.numel() * t.element_size() for w in expert_weights(model).values()
               for t in (w.packed, w.absmax, w.nested_absmax) if t is not None)


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """One process (global batch 8 = 4 x 2 accumulation), then one launch of two ranks (4 x 1 x 2) per strategy."""
    root = tmp_path_factory.mktemp("moe_dist")
    model = build_tiny_checkpoint(root / "model", "qwen3_moe")  # hidden 64, 2 layers, 4 experts, top 2
    _write_rows(root / "train.jsonl", range(100, 164))
    raw = _raw(root, model)
    del raw["eval"]
    raw["training"].update(max_steps=STEPS, save_steps=2, eval_steps=None, warmup_steps=1)
    (root / "recipe.json").write_text(json.dumps(raw))
    train(recipe_from_dict(raw), progress=False)
    resumed = {**raw["training"], "output_dir": str(root / "one_resumed")}
    train(recipe_from_dict({**raw, "training": resumed}), resume=str(root / "one" / "checkpoint-2"), progress=False)
    (root / "driver.py").write_text(MOE_DRIVER)
    done, seconds = _torchrun(root / "driver.py", root)
    assert done.returncode == 0, _rank_errors(done.stderr)
    return root, model, seconds


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_the_experts_as_one_process(moe_runs, strategy):
    root, _, _ = moe_runs
    one = _losses(root / "one")
    assert len(set(one.values())) == STEPS  # it trains
    _assert_same_losses(_losses(root / strategy), one, range(1, STEPS + 1))
    _assert_same_adapter(root / strategy, root / "one")
    want = load_file(root / "one" / "adapter" / "adapter_model.safetensors")
    experts = [k for k in want if ".mlp.experts." in k]
    # PEFT's target_parameters keys: experts.lora_A (down_proj) and experts.base_layer.lora_A (gate_up_proj)
    assert len(experts) == 2 * 2 * 2, experts  # 2 layers x (gate_up_proj, down_proj) x (A, B)
    for key in experts:  # the expert adapters trained (B starts at zero)
        assert not torch.equal(want[key], torch.zeros_like(want[key])), key
    config = json.loads((root / strategy / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((root / "one" / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"]
    summary = json.loads((root / strategy / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    assert (root / strategy / "checkpoint-2" / "adapter_model.safetensors").is_file()


def _assert_same_adapter(got_run: Path, want_run: Path) -> None:
    want = load_file(want_run / "adapter" / "adapter_model.safetensors")
    got = load_file(got_run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-7), (key, (got[key] - want[key]).abs().max())


@pytest.mark.parametrize("run", ["one_resumed", "fsdp_from_one", "ddp_from_fsdp"])
def test_a_resumed_moe_run_continues_as_the_uninterrupted_one(moe_runs, run):
    """The checkpoint's expert adapters (PEFT target_parameters keys) go back into the expert weights."""
    root, _, _ = moe_runs
    _assert_same_losses(_losses(root / run), _losses(root / "one"), range(3, STEPS + 1))
    _assert_same_adapter(root / run, root / "one")


def test_fsdp_shards_the_experts_4bit_storage(moe_runs):
    from nf4tune.models.load import load_model

    root, model, _ = moe_runs
    whole = _expert_storage_bytes(load_model(model, compute_dtype=torch.float32, device="cpu", progress=False)[0])
    assert whole > 0
    summaries = {name: json.loads((root / name / "summary.json").read_text()) for name in ("one", "ddp", "fsdp")}
    experts = {name: summaries[name]["expert_bytes_per_rank"] for name in ("ddp", "fsdp")}
    assert experts["ddp"] == whole  # a replica
    assert 0.45 < experts["fsdp"] / whole < 0.56, (experts, whole)  # each rank holds about half
    held = {name: s["param_bytes_per_rank"] for name, s in summaries.items()}
    assert held["ddp"] == held["one"]
    assert 0.45 < held["fsdp"] / held["one"] < 0.56, held  # the whole model too, experts included


def test_one_launch_of_both_strategies_is_quick(moe_runs):
    _, _, seconds = moe_runs
    assert seconds < 120, seconds  # about 25 s on 2 cores


def test_estimate_gives_the_bytes_each_rank_held(moe_runs):
    """`nf4tune estimate` (and `training.parallel=auto`) counts the experts' 4-bit storage as sharded under FSDP."""
    import math

    from nf4tune.plan.estimate import estimate
    from nf4tune.train.parallel import plan_arguments

    root, model, _ = moe_runs
    plan = plan_arguments(recipe_from_dict(json.loads((root / "recipe.json").read_text())))
    for run, est in (("one", estimate(str(model), gpus=1, **plan)), ("ddp", estimate(str(model), gpus=2, strategy="ddp", **plan)),
                     ("fsdp", estimate(str(model), gpus=2, strategy="fsdp", **plan))):
        held = json.loads((root / run / "summary.json").read_text())["param_bytes_per_rank"]
        assert math.isclose(est.weights_4bit + est.quant_constants + est.weights_16bit + est.lora, held,
                            rel_tol=0.01), (run, est, held)
