"""Mixture-of-experts QLoRA: every MoE family transformers 5 ships, from tiny random checkpoints written by
`save_pretrained` (per-expert keys, as on the Hub; gpt-oss's fused ones).

Oracles: transformers (its own loading fuses the experts; a float32 model holding the exact NF4 decode of
nf4tune's weights gives the logits), bitsandbytes (`quantize_4bit` on each fused parameter, flattened
row-major, gives the 4-bit bytes) and PEFT (`target_parameters` LoRA loads nf4tune's saved adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.errors import Nf4tuneError
from nf4tune.layers import LoraConfig
from nf4tune.layers.experts4bit import ExpertWeight4bit, expert_weights
from nf4tune.layers.linear4bit import Linear4bit
from nf4tune.models.adapters import save_adapter
from nf4tune.models.load import load_model
from nf4tune.registry import families

bnb_F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for the 4-bit bytes")
peft = pytest.importorskip("peft", reason="PEFT is the oracle for the expert adapters")

MOE_FAMILIES = families("moe_experts")
IDS = torch.tensor([[1, 40, 41, 42, 15, 77, 90, 3, 60, 33], [1, 55, 23, 78, 9, 10, 11, 12, 13, 14]])


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, folder) of a tiny bfloat16 checkpoint as `save_pretrained` writes it, in several shards."""
    path = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, build_tiny_checkpoint(path, request.param)


def _load(path, **kwargs):
    return load_model(path, compute_dtype=torch.float32, device="cpu", progress=False, **kwargs)[0]


def _transformers(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _decoded_reference(path, model):
    """transformers' float32 model of `path` holding the exact decode of `model`'s 4-bit weights."""
    reference = _transformers(path)
    weights = {f"{n}.weight": m.dequantized_weight(torch.float32) for n, m in model.named_modules()
               if isinstance(m, Linear4bit)}
    weights |= {n: w.dequantized(torch.float32) for n, w in expert_weights(model).items()}
    result = reference.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    return reference


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _close(ours, theirs, rel=1e-5):
    # the same float32 weights; only the order of the sums (and the experts' accumulation) differs
    assert (ours - theirs).abs().max() <= rel * theirs.abs().max(), (ours - theirs).abs().max()


def test_checkpoint_holds_the_layout_transformers_saves(checkpoint):
    family, path = checkpoint
    keys = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    per_expert = any(".experts.0." in k for k in keys)
    assert per_expert == (family != "gpt_oss"), sorted(k for k in keys if "expert" in k)[:4]


def test_experts_load_in_4bit_with_bitsandbytes_bytes(checkpoint):
    family, path = checkpoint
    model = _load(path)
    weights = expert_weights(model)
    fused = {n: p for n, p in _transformers(path, torch.bfloat16).named_parameters() if p.dim() == 3}
    assert set(weights) == set(fused) and weights
    for name, weight in weights.items():
        q = weight.quantized_weight
        assert q.nbytes / q.numel <= 0.6 and q.double_quant and q.blocksize == 64, name
        packed, state = bnb_F.quantize_4bit(fused[name].reshape(-1), blocksize=64, compress_statistics=True,
                                           quant_type="nf4")
        assert torch.equal(q.packed.view(-1), packed.view(-1)), name
        assert torch.equal(q.absmax, state.absmax) and torch.equal(q.nested_absmax, state.state2.absmax), name
        assert q.offset == float(state.offset.detach()), name
    # the router stays in the compute dtype, a plain parameter
    routers = [p for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert routers and all(p.dtype == torch.float32 for p in routers)


def test_logits_equal_transformers_on_the_decoded_weights(checkpoint):
    family, path = checkpoint
    model = _load(path)
    _close(_logits(model), _logits(_decoded_reference(path, model)))
    # and differ from the unquantized model's: the experts are really quantized
    assert (_logits(model) - _logits(_transformers(path))).abs().max() > 1e-4


def test_expert_adapter_loads_in_peft_with_the_same_logits(checkpoint, tmp_path):
    family, path = checkpoint
    model = _load(path, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    experts = {n: w for n, w in expert_weights(model).items() if w.lora_A is not None}
    assert experts and len(experts) == len(expert_weights(model))  # all-linear covers the experts
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ours = _logits(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["lora_dropout"] == 0.0

    theirs = peft.PeftModel.from_pretrained(_decoded_reference(path, _load(path)), tmp_path / "adapter")
    _close(ours, _logits(theirs))
    # nf4tune reads the adapter back
    again = _load(path, adapter=tmp_path / "adapter")
    _close(_logits(again), ours, rel=1e-6)


def test_training_lowers_the_loss_through_the_4bit_experts(checkpoint):
    family, path = checkpoint
    torch.manual_seed(0)
    model = _load(path, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["experts.gate_up_proj", "experts.down_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), ExpertWeight4bit)
                             for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        # B starts at zero (A's gradient with it), so B's gradient is what flows through the 4-bit experts first
        assert all(w.lora_B.grad.abs().sum() > 0 for w in expert_weights(model).values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_incomplete_checkpoint_names_the_missing_expert_tensor(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "model", "qwen3_moe", max_shard_size=None)
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.experts.2.up_proj.weight"}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Nf4tuneError, match=r"lacks model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight .*"
                                           r"fused into model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        _load(path)


def test_unknown_expert_layout_is_refused_before_loading(tmp_path, monkeypatch):
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    path = build_tiny_checkpoint(tmp_path / "model", "qwen3_moe")

    class Experts(torch.nn.Module):  # fused experts without transformers' @use_experts_implementation layout
        def __init__(self, config):
            super().__init__()
            n, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
            self.gate_up_proj = torch.nn.Parameter(torch.empty(n, 2 * inner, hidden))
            self.down_proj = torch.nn.Parameter(torch.empty(n, hidden, inner))

    monkeypatch.setattr(modeling_qwen3_moe, "Qwen3MoeExperts", Experts)
    with pytest.raises(Nf4tuneError, match=r"model\.layers\.0\.mlp\.experts \(Experts\) is a mixture-of-experts "
                                           r"module whose layout nf4tune does not know: it lacks the has_gate flag"):
        _load(path)


def test_quantized_checkpoint_holds_4bit_experts_and_loads_as_quantize_on_load(checkpoint, tmp_path):
    from nf4tune.checkpoint.quantize import quantize_checkpoint

    family, path = checkpoint
    report = quantize_checkpoint(path, tmp_path / "bnb", progress=False)
    assert report.quantized_params > 0
    keys = set()
    for shard in (tmp_path / "bnb").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    fused = [n for n, p in _transformers(path).named_parameters() if p.dim() == 3]
    assert fused and all(f"{n}.absmax" in keys and f"{n}.quant_state.bitsandbytes__nf4" in keys for n in fused)
    assert not any(".experts.0." in k for k in keys)  # no per-expert 16-bit tensor left
    loaded, streamed = _load(tmp_path / "bnb"), _load(path)
    ours, theirs = expert_weights(loaded), expert_weights(streamed)
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        a, b = weight.quantized_weight, theirs[name].quantized_weight
        assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax) and a.offset == b.offset, name
    _close(_logits(loaded), _logits(streamed), rel=1e-6)


def test_unquantized_base_keeps_the_experts_in_the_compute_dtype(checkpoint):
    family, path = checkpoint
    model = _load(path, quant_type="none")
    assert all(w.dense is not None and w.packed is None for w in expert_weights(model).values())
    _close(_logits(model), _logits(_transformers(path)))


def test_trainer_resume_restores_the_expert_adapters(tmp_path):
    """What Trainer's resume_from_checkpoint does: save_pretrained, then load_state_dict of the adapter file."""
    from safetensors.torch import load_file

    path = build_tiny_checkpoint(tmp_path / "model", "qwen3_moe")
    model = _load(path, lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "checkpoint-1")
    fresh = _load(path, lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    fresh.load_state_dict(load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors"))
    _close(_logits(fresh), _logits(model), rel=1e-6)


def test_experts_that_straddle_blocks_compute_the_same_function(tmp_path):
    """An expert whose weights do not fill whole 64-element blocks (48 x 10 = 7.5 blocks) is decoded from the
    blocks around it: the logits are still transformers' on the decoded weights, the bytes bitsandbytes'."""
    path = build_tiny_checkpoint(tmp_path / "model", "qwen3_moe", hidden_size=48, moe_intermediate_size=10)
    model = _load(path)
    down = expert_weights(model)["model.layers.0.mlp.experts.down_proj"]
    assert down.shape[1] * down.shape[2] % 64
    reference = _transformers(path, torch.bfloat16).get_parameter("model.layers.0.mlp.experts.down_proj")
    packed, state = bnb_F.quantize_4bit(reference.detach().reshape(-1), blocksize=64, compress_statistics=True,
                                       quant_type="nf4")
    assert torch.equal(down.quantized_weight.packed.view(-1), packed.view(-1))
    for e in range(down.num_experts):
        assert torch.equal(down.expert(e, torch.float32), down.dequantized(torch.float32)[e])
    reference = _decoded_reference(path, model)
    reference.set_experts_implementation("eager")  # transformers' grouped_mm needs 16-byte strides
    _close(_logits(model), _logits(reference))
