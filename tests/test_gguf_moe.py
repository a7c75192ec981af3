"""GGUF export of mixture-of-experts models: Qwen3-MoE, Qwen2-MoE (with its shared expert and its gate), OLMoE and
Mixtral (llama.cpp's llama with expert tensors), from the per-expert checkpoints `save_pretrained` writes and from
transformers 5's fused layout; llama.cpp itself (llama-cpp-python) is the oracle: the same logits within 1% and the
same greedy tokens as transformers' float model. Variants llama.cpp's graphs lack are refused with one sentence."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError
from nf4tune.models.export import export_adapter_gguf, export_gguf

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install gguf)")

from test_gguf import SPLIT_TEXT, _tokenizer_of_style  # noqa: E402
from test_gguf_families import _LLAMA_CPP_MISSING, assert_llama_cpp_agrees  # noqa: E402

# Tiny shapes llama.cpp's CPU kernels take (rows of 32 for Q8_0), 4 experts of which 2 per token.
_MOE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2)
# Per case: (model_type, tokenizer style, config fields); each sets what llama.cpp must be told away from its default:
# experts of their own size (moe_intermediate_size, not intermediate_size), the shared expert's own size.
_CASES = {
    "qwen3_moe": ("qwen3_moe", "qwen2", dict(_MOE, head_dim=32, num_experts=4, moe_intermediate_size=32,
                                             norm_topk_prob=True)),
    "qwen2_moe": ("qwen2_moe", "qwen2", dict(_MOE, num_experts=4, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64)),
    # llama.cpp's olmoe has as many key/value heads as query heads
    "olmoe": ("olmoe", "gpt-2", dict(_MOE, num_experts=4, num_key_value_heads=4)),
    "mixtral": ("mixtral", "llama-bpe", dict(_MOE, num_local_experts=4)),
}


def build_moe(root, case: str, vocab_extra: int = 0, sharp: bool = True, **extra):
    """A tiny random MoE model of `case` with its tokenizer in root / "src", as `save_pretrained` writes it (one
    matrix per expert), made hard to export by accident: routers scaled up so each token clearly prefers its
    experts, random norm weights and biases, every matrix rounded to float16 as an f16 file stores it; `sharp`,
    also Q/K and the experts scaled up (attention position-dependent, an expert out of order far off).
    Returns (folder, tokenizer, the model in float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, style, fields = _CASES[case]
    tok = _tokenizer_of_style(style)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok) + vocab_extra, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **{**fields, **extra})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "norm.weight")):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                if sharp and name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(12)
                if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                if sharp and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    p.mul_(4)  # the experts' outputs large enough that which experts a token uses shows
                if p.dim() >= 2:
                    p.copy_(p.half().float())
    src = root / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src, tok, model


def _ids(tok) -> list[int]:
    return tok(SPLIT_TEXT).input_ids[:16]


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("case", list(_CASES))
def test_save_pretrained_writes_one_matrix_per_expert(case, tmp_path):
    """The checkpoints these tests export are the Hub's layout (one matrix per expert), not transformers' fused one:
    the fused layout is tested below by writing it."""
    src, _, _ = build_moe(tmp_path, case)
    keys = set(load_file(src / "model.safetensors"))
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    assert any(".experts.3." in k for k in keys)


@pytest.mark.parametrize("case", list(_CASES))
def test_llama_cpp_runs_each_moe_family(case, tmp_path):
    """Qwen3-MoE (q/k norms, renormalized top-k weights), Qwen2-MoE (shared expert with a sigmoid gate, q/k/v
    biases), OLMoE (q/k norms over the whole projection) and Mixtral (as llama), exported f16 with 7 unused embedding
    rows: llama.cpp's logits within 1% of the model's own and the same greedy tokens; the router stays float32."""
    pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    src, tok, model = build_moe(tmp_path, case, vocab_extra=7)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, progress=False)
    assert_llama_cpp_agrees(out, model, tok, _ids(tok))
    tensors = _tensors(out)
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type.name == "F16"


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen2_moe"])
def test_llama_cpp_runs_each_moe_family_in_q8_0(case, tmp_path):
    """--type q8_0: the stacked experts and the shared expert in Q8_0 (routers float32); llama.cpp's logits within 3%
    of the float model's largest (8-bit blocks, as the dense q8_0 test states; measured 1.4%) and the same greedy
    tokens. A model without the sharpened attention and experts: there llama.cpp's 8-bit activations alone are 2-5%
    off, enough to send a token near a tie to other experts."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    from test_gguf_families import _greedy, _llama_cpp_logits, _logits, _transformers_greedy

    src, tok, model = build_moe(tmp_path, case, sharp=False)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, kind="q8_0", progress=False)
    types = {name: t.tensor_type.name for name, t in _tensors(out).items()}
    assert types["blk.0.ffn_down_exps.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    if case == "qwen2_moe":
        assert types["blk.0.ffn_up_shexp.weight"] == "Q8_0" and types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    ids = _ids(tok)
    theirs, llm = _llama_cpp_logits(llama_cpp, out, ids)
    ours = _logits(model, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < 0.03 * ours.abs().max(), (theirs - ours).abs().max() / ours.abs().max()
    assert _greedy(llm, ids) == _transformers_greedy(model, ids, tok)


def _fuse(src, dst, case: str) -> None:
    """Rewrite the checkpoint in `src` into `dst` in transformers 5's in-memory layout: per layer one
    experts.gate_up_proj [E, 2I, H] (gate rows first) and one experts.down_proj [E, H, I] (Mixtral's
    block_sparse_moe renamed mlp, as transformers loads it)."""
    import shutil

    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    gate, up, down = ("w1", "w3", "w2") if case == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    n = max(int(k.split(".experts.")[1].split(".")[0]) for k in state if ".experts." in k) + 1
    out = {}
    for key, t in state.items():
        if ".experts.0." in key and key.endswith(f".{gate}.weight"):
            prefix = key.split(".experts.")[0] + ".experts"
            fused = prefix.replace("block_sparse_moe", "mlp")
            out[f"{fused}.gate_up_proj"] = torch.stack([torch.cat([state[f"{prefix}.{j}.{gate}.weight"],
                                                                   state[f"{prefix}.{j}.{up}.weight"]]) for j in range(n)])
            out[f"{fused}.down_proj"] = torch.stack([state[f"{prefix}.{j}.{down}.weight"] for j in range(n)])
        elif ".experts." not in key:
            out[key.replace("block_sparse_moe", "mlp")] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["qwen2_moe", "mixtral"])
def test_the_fused_layout_exports_as_the_per_expert_one(case, tmp_path):
    """A checkpoint in transformers 5's fused layout (experts.gate_up_proj / experts.down_proj, as a model's own
    state dict holds them) exports to the same file as the per-expert checkpoint, tensor for tensor; and transformers
    itself reads the fused checkpoint as the same model (so the fused layout written here is transformers')."""
    from transformers import AutoModelForCausalLM

    src, tok, model = build_moe(tmp_path, case)
    _fuse(src, tmp_path / "fused", case)
    reread = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    for name, p in model.state_dict().items():
        assert torch.equal(reread.state_dict()[name], p), name
    export_gguf(src, tmp_path / "a.gguf", progress=False)
    export_gguf(tmp_path / "fused", tmp_path / "b.gguf", progress=False)
    a, b = _tensors(tmp_path / "a.gguf"), _tensors(tmp_path / "b.gguf")
    assert sorted(a) == sorted(b)
    for name in a:
        assert bytes(a[name].data) == bytes(b[name].data), name


def test_experts_are_stacked_in_order(tmp_path):
    """ffn_{gate,up,down}_exps hold expert j's matrices at index j, [E, out, in] in torch order (llama.cpp's
    {in, out, E}); expert_count, expert_used_count and the experts' own sizes are llama.cpp's keys."""
    src, _, model = build_moe(tmp_path, "qwen2_moe")
    export_gguf(src, tmp_path / "m.gguf", progress=False)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert {k: fields[k] for k in ("qwen2moe.expert_count", "qwen2moe.expert_used_count",
                                   "qwen2moe.expert_feed_forward_length", "qwen2moe.expert_shared_feed_forward_length",
                                   "qwen2moe.feed_forward_length")} == {
        "qwen2moe.expert_count": 4, "qwen2moe.expert_used_count": 2, "qwen2moe.expert_feed_forward_length": 32,
        "qwen2moe.expert_shared_feed_forward_length": 64, "qwen2moe.feed_forward_length": 96}
    experts = model.model.layers[1].mlp.experts
    gate, up = experts.gate_up_proj.chunk(2, dim=1)
    torch.testing.assert_close(tensors["blk.1.ffn_gate_exps.weight"], gate, rtol=0, atol=0)
    torch.testing.assert_close(tensors["blk.1.ffn_up_exps.weight"], up, rtol=0, atol=0)
    torch.testing.assert_close(tensors["blk.1.ffn_down_exps.weight"], experts.down_proj, rtol=0, atol=0)
    shared = model.model.layers[1].mlp
    assert tensors["blk.1.ffn_gate_inp_shexp.weight"].shape == (64,)
    torch.testing.assert_close(tensors["blk.1.ffn_gate_inp_shexp.weight"], shared.shared_expert_gate.weight[0])
    torch.testing.assert_close(tensors["blk.1.ffn_gate_inp.weight"], shared.gate.weight)


def test_a_checkpoint_missing_an_expert_is_refused(tmp_path, capsys):
    src, _, _ = build_moe(tmp_path, "olmoe")
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    # one sentence naming the missing expert tensor (the loader's key conversion or the exporter's stacking,
    # whichever meets it first)
    assert err.startswith("error: ") and "experts" in err and "up_proj" in err and "incomplete" in err, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


_VARIANTS = {  # case: (config fields, what the sentence names)
    "qwen3_moe": (dict(norm_topk_prob=False), "norm_topk_prob"),
    "qwen3_moe-dense-layers": (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    "qwen2_moe": (dict(norm_topk_prob=True), "norm_topk_prob"),
    "qwen2_moe-sparse-step": (dict(decoder_sparse_step=2), "decoder_sparse_step"),
    "olmoe": (dict(clip_qkv=8.0), "clip_qkv"),
    "olmoe-gqa": (dict(num_key_value_heads=2), "key/value heads"),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_variants_llama_cpp_lacks_are_refused_with_a_sentence(variant, tmp_path, capsys):
    """Qwen3-MoE without renormalized top-k weights (llama.cpp's qwen3moe always renormalizes) or with dense layers,
    Qwen2-MoE with them renormalized (llama.cpp's qwen2moe never does) or experts on every other layer only, OLMoE
    with clipped q/k/v or grouped-query attention: one sentence, no file."""
    fields, named = _VARIANTS[variant]
    src, _, _ = build_moe(tmp_path, variant.split("-")[0], **fields)
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "cannot be exported" in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.gguf"))


def test_a_moe_gguf_base_is_refused_with_a_sentence(tmp_path, capsys):
    """A mixture-of-experts GGUF file as the base (transformers' GGUF reader, nf4tune's way in, loses its experts):
    one sentence, no file."""
    src, _, _ = build_moe(tmp_path, "qwen3_moe")
    export_gguf(src, tmp_path / "m.gguf", progress=False)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "again.gguf")]) == 2
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and "Hugging Face checkpoint" in err and err.count("\n") == 1, err
    assert not (tmp_path / "again.gguf").exists()


def test_gpt_oss_and_q4_k_m_are_refused_with_a_sentence(tmp_path, capsys):
    """gpt-oss (not exported yet) and Q4_K_M for a mixture of experts (llama.cpp's mix has rules of its own there):
    one sentence each, from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, _, _ = build_moe(tmp_path, "mixtral")
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "m.gguf"), "--type", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert "Q4_K_M" in err and "llama-quantize" in err and err.count("\n") == 1, err
    oss = tmp_path / "oss"
    config = AutoConfig.for_model("gpt_oss", **dict(_MOE, num_local_experts=4, head_dim=16, vocab_size=300))
    AutoModelForCausalLM.from_config(config).save_pretrained(oss)
    capsys.readouterr()
    assert main(["export", str(oss), str(tmp_path / "oss.gguf")]) == 2
    err = capsys.readouterr().err
    assert "'gpt_oss'" in err and "not supported" in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.gguf"))


def _attention_adapter(src, root, targets):
    """A PEFT LoRA adapter on `targets` of the model in `src`, B random (as after training)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    model.save_pretrained(root / "adapter")
    return root / "adapter", model


def test_an_attention_adapter_merges_into_the_moe_export(tmp_path):
    """A LoRA adapter on a Qwen3-MoE's attention merges into the export: llama.cpp's logits within 1% of PEFT's
    model's and the same greedy tokens."""
    pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    pytest.importorskip("peft", reason="PEFT makes the adapter")
    src, tok, _ = build_moe(tmp_path, "qwen3_moe")
    adapter, peft_model = _attention_adapter(src, tmp_path, dict(target_modules=["q_proj", "v_proj", "o_proj"]))
    export_gguf(src, tmp_path / "m.gguf", adapter, progress=False)
    assert_llama_cpp_agrees(tmp_path / "m.gguf", peft_model.eval(), tok, _ids(tok))


def test_llama_cpp_applies_an_attention_adapter_only_gguf_on_the_moe_export(tmp_path):
    """`--adapter-only` for a Qwen2-MoE's attention adapter: llama.cpp's --lora on the base's own export gives the
    merged export's logits within 1% (and without it they are far apart)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    pytest.importorskip("peft", reason="PEFT makes the adapter")
    from test_gguf_families import _llama_cpp_logits

    src, tok, _ = build_moe(tmp_path, "qwen2_moe")
    adapter, _ = _attention_adapter(src, tmp_path, dict(target_modules=["q_proj", "k_proj", "o_proj"]))
    export_gguf(src, tmp_path / "base.gguf", progress=False)
    export_gguf(src, tmp_path / "merged.gguf", adapter, progress=False)
    assert main(["export", str(src), str(tmp_path / "lora.gguf"), "--adapter", str(adapter), "--adapter-only"]) == 0
    ids = _ids(tok)
    merged, _ = _llama_cpp_logits(llama_cpp, tmp_path / "merged.gguf", ids)
    applied, _ = _llama_cpp_logits(llama_cpp, tmp_path / "base.gguf", ids, lora_path=str(tmp_path / "lora.gguf"))
    base, _ = _llama_cpp_logits(llama_cpp, tmp_path / "base.gguf", ids)
    scale = merged.abs().max()
    assert (applied - merged).abs().max() < 0.01 * scale, (applied - merged).abs().max() / scale
    assert (base - merged).abs().max() > 0.05 * scale


def test_an_adapter_on_the_experts_is_refused_with_a_sentence(tmp_path, capsys):
    """An adapter with LoRA on the experts (PEFT's target_parameters) merged or adapter-only: one sentence, no file."""
    pytest.importorskip("peft", reason="PEFT makes the adapter")
    src, _, _ = build_moe(tmp_path, "qwen3_moe")
    adapter, _ = _attention_adapter(src, tmp_path, dict(target_modules=["q_proj"],
                                                        target_parameters=["mlp.experts.down_proj"]))
    for flags in ([], ["--adapter-only"]):
        capsys.readouterr()
        assert main(["export", str(src), str(tmp_path / "m.gguf"), "--adapter", str(adapter), *flags]) == 2
        err = capsys.readouterr().err
        assert "experts" in err and "target_parameters" in err and err.count("\n") == 1, err
    with pytest.raises(Nf4tuneError, match="target_parameters"):
        export_adapter_gguf(src, tmp_path / "m.gguf", adapter)
    assert not list(tmp_path.glob("*.gguf"))
