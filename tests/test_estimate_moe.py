"""`nf4tune estimate` on mixtures of experts: the fused experts (3-D parameters) count in 4-bit, per-expert LoRA as
PEFT's `target_parameters` makes it, and the activations of the active experts only. Oracles: the parameters of
tiny MoE models transformers builds for real, and the LoRA parameters PEFT adds to them."""

import json
import warnings

import pytest
import torch

from nf4tune.cli.main import main
from nf4tune.plan.estimate import estimate

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
FAMILIES = {
    "qwen3_moe": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=96, num_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    # a shared expert and a first dense layer; multi-head latent attention
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
}
EXPERT_WEIGHTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _build(family: str, tmp_path, **overrides):
    """A tiny model of `family`, built by transformers with weights, and its config.json in a folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**SMALL, **FAMILIES[family], **overrides})
    folder = tmp_path / family
    cfg.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(cfg), str(folder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_count_in_4bit_and_their_lora_as_peft_makes_it(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, folder = _build(family, tmp_path)
    est = estimate(folder, r=4)
    params = dict(model.named_parameters())
    fused = [p for n, p in params.items() if ".experts." in n and p.dim() == 3]
    experts = sum(p.numel() for p in fused)
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    assert est.parameters == sum(p.numel() for p in params.values())
    assert est.expert_parameters == experts > 0
    assert est.quantized_parameters == experts + sum(m.weight.numel() for m in linears.values())
    # the router (a parameter of its own module, not an nn.Linear), biases, norms, embeddings: the compute dtype
    routers = [n for n in params if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert routers and est.weights_16bit == (est.parameters - est.quantized_parameters) * 2
    assert round((est.weights_4bit + est.quant_constants) * 8 / est.quantized_parameters, 3) == 4.127
    assert est.experts == fused[0].shape[0] and est.experts_per_token == 2

    # PEFT wraps the experts on its own (o_proj beside them: it wants a module target too)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"], target_parameters=EXPERT_WEIGHTS))
    on_experts = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n and ".experts." in n)
    assert est.expert_lora_parameters == on_experts > 0
    assert est.lora_parameters == on_experts + sum(4 * (m.in_features + m.out_features) for m in linears.values())
    attention_only = estimate(folder, r=4, target="o_proj")
    assert attention_only.expert_lora_parameters == 0 and attention_only.lora_parameters < est.lora_parameters


def test_activations_are_the_active_experts_only(tmp_path):
    _, eight = _build("qwen3_moe", tmp_path / "a")
    _, sixteen = _build("qwen3_moe", tmp_path / "b", num_experts=16)
    _, four_active = _build("qwen3_moe", tmp_path / "c", num_experts_per_tok=4)
    base, more, busier = (estimate(p, seq_len=512, checkpointing=False) for p in (eight, sixteen, four_active))
    assert more.expert_parameters == 2 * base.expert_parameters
    # twice the experts: only the routers' float32 logits and probabilities grow (8 bytes per expert, token, layer)
    assert more.activations - base.activations == 2 * 512 * 8 * 8
    # twice the active experts: each keeps 3 hidden-size and 4 intermediate-size values per token (bfloat16)
    assert busier.activations - base.activations == 2 * 512 * 2 * 2 * (3 * 64 + 4 * 32)
    assert busier.weights_4bit == base.weights_4bit


def test_the_table_names_the_experts(tmp_path, capsys):
    _, folder = _build("mixtral", tmp_path)
    assert main(["estimate", folder]) == 0
    out = capsys.readouterr().out
    assert "in experts (4 per layer, 2 active)" in out and "on experts (per expert)" in out and "routers" in out
    assert main(["estimate", folder, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts_per_token"] == 2
