"""GGUF export for today's families: vocabularies padded to the embedding (Qwen2.5 / Qwen3), Gemma 2, Gemma 3,
SmolLM3, Granite and OLMo 2, refusals from the config before anything loads, and adapter-only LoRA GGUF files.
llama.cpp itself (llama-cpp-python, optional extra `llamacpp`) is the oracle where it is installed."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nf4tune
from nf4tune.cli.main import main
from nf4tune.errors import Nf4tuneError
from nf4tune.layers.lora import lora_layers
from nf4tune.models.export import export_adapter_gguf, export_gguf

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install gguf)")

from test_gguf import SPLIT_TEXT, _logits, _tokenizer_of_style  # noqa: E402  (helpers shared with the GGUF tests)

_LLAMA_CPP_MISSING = "llama.cpp check needs `pip install llama-cpp-python` (extra llamacpp)"

# Tiny shapes llama.cpp's CPU kernels take: hidden 64, heads of 16 (Gemma's of 64, as in every Gemma).
_DECODER = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# Per case: (model_type, tokenizer style, config fields). Each sets what llama.cpp must be told away from its
# default, so a key left out or mapped wrongly changes the logits: Gemma 2's soft-caps low enough to bite, a
# window of 4 tokens over a 16-token prompt and local / global layers in another order than llama.cpp assumes;
# Gemma 3's local rope base far from the global one; SmolLM3's 4th layer without rotary; Granite's four
# multipliers away from 1 (and from llama.cpp's 1/sqrt(head_dim) attention scale); OLMo 2's q/k norms over the
# whole projection and norms after attention and MLP.
_GEMMA = dict(_DECODER, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              query_pre_attn_scalar=64, tie_word_embeddings=True, num_hidden_layers=3, sliding_window=4)
_CASES = {
    "gemma2": ("gemma2", "sentencepiece-no-prefix",
               dict(_GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=2.0,
                    layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    "gemma3_text": ("gemma3_text", "sentencepiece-no-prefix",
                    dict(_GEMMA, final_logit_softcapping=None,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "gemma3_text-linear": ("gemma3_text", "sentencepiece-no-prefix",
                           dict(_GEMMA, final_logit_softcapping=3.0,
                                layer_types=["sliding_attention", "full_attention", "full_attention"],
                                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                    "rope_theta": 10000.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "smollm3": ("smollm3", "llama-bpe", dict(_DECODER, num_hidden_layers=4)),
    "granite": ("granite", "gpt-2", dict(_DECODER, embedding_multiplier=6.0, residual_multiplier=0.5,
                                         attention_multiplier=0.5, logits_scaling=4.0)),
    "olmo2": ("olmo2", "gpt-2", dict(_DECODER, tie_word_embeddings=False)),
}


def build_tiny(tmp_path, model_type: str, style: str, vocab_extra: int = 0, **fields):
    """A tiny random `model_type` with a tokenizer of `style` in tmp_path / "src", its embedding `vocab_extra` rows
    larger than the tokenizer, made hard to export by accident as test_gguf's models are: random biases and norm
    weights, attention made position-dependent (Q/K scaled up, or the q/k norms that follow them), every matrix
    rounded to float16 as an f16 file stores it. Returns (folder, tokenizer, the model in float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer_of_style(style)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok) + vocab_extra, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "norm.weight")):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(12)
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.add_(0.75 if model_type.startswith("gemma") else 0.0).mul_(2)  # Gemma scales by 1 + w
                if p.dim() == 2:
                    p.copy_(p.half().float())
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src, tok, model


def _case(case: str, tmp_path, **extra):
    model_type, style, fields = _CASES[case]
    return build_tiny(tmp_path, model_type, style, **{**fields, **extra})


def _llama_cpp_logits(llama_cpp, path, ids, **kwargs) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64, **kwargs)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)]), llm


def _greedy(llm, ids, n: int = 5) -> list[int]:
    llm.reset()
    return [t for _, t in zip(range(n), llm.generate(ids, temp=0.0, top_k=1))]


def _transformers_greedy(model, ids, tok, n: int = 5) -> list[int]:
    return model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                          do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()


def assert_llama_cpp_agrees(path, model, tok, ids) -> None:
    """llama.cpp's logits on `ids` within 1% of the largest of `model`'s, and the same 5 greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    theirs, llm = _llama_cpp_logits(llama_cpp, path, ids)
    ours = _logits(model, torch.tensor([ids]))[0]
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 0.01 * ours.abs().max(), (theirs - ours).abs().max() / ours.abs().max()
    assert _greedy(llm, ids) == _transformers_greedy(model, ids, tok)


# Vocabulary padding: Qwen2.5 and Qwen3 (and others) keep embedding rows no token uses.

_PADDED = {"llama": ("llama", "llama-bpe", _DECODER), "mistral": ("mistral", "sentencepiece", _DECODER),
           "qwen2": ("qwen2", "qwen2", _DECODER), "qwen3": ("qwen3", "qwen2", dict(_DECODER, head_dim=128))}


def test_vocabulary_is_padded_to_the_embedding_with_unused_tokens(tmp_path):
    """The file's vocabulary has exactly token_embd's rows: the tokenizer's tokens, then "[PAD{id}]" tokens of type
    UNUSED (SentencePiece-style ones with llama.cpp's pad score); through a GGUF base the padded vocabulary is
    copied as it is."""
    for case in ("qwen2", "mistral"):
        model_type, style, fields = _PADDED[case]
        src, tok, _ = build_tiny(tmp_path / case, model_type, style, vocab_extra=37, **fields)
        out = tmp_path / case / "m.gguf"
        export_gguf(src, out, progress=False)
        reader = gguf.GGUFReader(out)
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        embd = {t.name: t for t in reader.tensors}["token_embd.weight"]
        assert len(tokens) == len(types) == int(embd.shape[1]) == len(tok) + 37
        assert tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 37)]
        assert set(types[len(tok):]) == {gguf.TokenType.UNUSED} and gguf.TokenType.UNUSED not in types[:len(tok)]
        assert tokens[:len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
        if case == "mistral":
            assert reader.fields["tokenizer.ggml.scores"].contents()[len(tok):] == [-1000.0] * 37
        again = tmp_path / case / "again.gguf"
        export_gguf(out, again, progress=False)
        assert gguf.GGUFReader(again).fields["tokenizer.ggml.tokens"].contents() == tokens


def test_a_vocabulary_the_embedding_cannot_hold_is_refused(tmp_path, capsys):
    """A tokenizer with more tokens than the embedding has rows, and a config whose vocab_size is not the
    embedding's (llama.cpp would refuse either file: "wrong shape"): one sentence, no file."""
    src, tok, _ = build_tiny(tmp_path / "small", "qwen2", "qwen2", vocab_extra=-5, **_DECODER)
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "small.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer has {len(tok)} tokens but the model's embedding has {len(tok) - 5} rows" in err
    assert err.count("\n") == 1
    src, _, _ = build_tiny(tmp_path / "lying", "qwen2", "qwen2", vocab_extra=3, **_DECODER)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "lying.gguf")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("error: token_embd.weight has") and "llama.cpp would refuse the file" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("case", list(_PADDED))
def test_llama_cpp_runs_models_whose_embedding_outgrows_the_tokenizer(case, tmp_path):
    """Llama, Mistral, Qwen2 and Qwen3 whose embedding has 37 rows more than the tokenizer (as Qwen2.5 / Qwen3's):
    llama.cpp loads the export, its logits within 1% of the model's own, the same greedy tokens."""
    pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    model_type, style, fields = _PADDED[case]
    src, tok, model = build_tiny(tmp_path, model_type, style, vocab_extra=37, **fields)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, progress=False)
    assert_llama_cpp_agrees(out, model, tok, tok(SPLIT_TEXT).input_ids[:16])


# The new families, run by llama.cpp.

@pytest.mark.parametrize("case", list(_CASES))
def test_llama_cpp_runs_each_new_family(case, tmp_path):
    """Gemma 2 (soft-caps, sliding window, norms after attention and MLP), Gemma 3 (q/k norms, local and global
    rope bases, linear scaling on the global layers), SmolLM3 (no rotary on its 4th layer), Granite (embedding,
    residual, attention and logit multipliers) and OLMo 2 (q/k norms, post-norms), exported as f16, with 11 unused
    embedding rows: llama.cpp's logits within 1% of the model's own and the same greedy tokens."""
    pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    src, tok, model = _case(case, tmp_path, vocab_extra=11)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, progress=False)
    assert_llama_cpp_agrees(out, model, tok, tok(SPLIT_TEXT).input_ids[:16])


def test_new_families_write_llama_cpps_keys(tmp_path):
    """What llama.cpp reads for each family, as its converter writes it (llama.cpp-free)."""
    expected = {
        "gemma2": {"gemma2.attn_logit_softcapping": 5.0, "gemma2.final_logit_softcapping": 2.0,
                   "gemma2.attention.sliding_window": 4, "gemma2.attention.sliding_window_pattern": [False, True, True],
                   "gemma2.attention.key_length": 64},
        "gemma3_text": {"gemma3.rope.freq_base": 10000.0, "gemma3.rope.freq_base_swa": 100.0,
                        "gemma3.attention.sliding_window_pattern": [True, False, True]},
        "granite": {"granite.embedding_scale": 6.0, "granite.residual_scale": 0.5, "granite.attention.scale": 0.5,
                    "granite.logit_scale": 4.0},
    }
    for case, keys in expected.items():
        src, _, _ = _case(case, tmp_path / case)
        export_gguf(src, tmp_path / case / "m.gguf", progress=False)
        fields = gguf.GGUFReader(tmp_path / case / "m.gguf").fields
        assert {k: fields[k].contents() for k in keys if k in fields} == keys, case
    olmo2, _, _ = _case("olmo2", tmp_path / "olmo2")
    export_gguf(olmo2, tmp_path / "olmo2" / "m.gguf", progress=False)
    names = {t.name for t in gguf.GGUFReader(tmp_path / "olmo2" / "m.gguf").tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight",
            "output.weight"} <= names and "blk.0.attn_norm.weight" not in names


_VARIANTS = {  # case: (config fields, what the sentence names)
    "gemma2": (dict(attn_logit_softcapping=None), "attn_logit_softcapping"),
    "gemma3_text": (dict(query_pre_attn_scalar=32), "query_pre_attn_scalar"),
    "smollm3": (dict(no_rope_layers=[1, 1, 1, 1]), "no_rope_layers"),
    "olmo2": (dict(tie_word_embeddings=True), "tie_word_embeddings"),
}


@pytest.mark.parametrize("case", list(_VARIANTS))
def test_variants_llama_cpp_lacks_are_refused_with_a_sentence(case, tmp_path, capsys):
    """Gemma 2 without attention soft-capping (llama.cpp's always caps), Gemma 3 with a query scale llama.cpp does
    not derive, SmolLM3 with rotary on every layer (llama.cpp's skips every 4th), OLMo 2 with a tied head
    (llama.cpp's needs its own): one sentence, no file."""
    fields, named = _VARIANTS[case]
    src, _, _ = _case(case, tmp_path, **fields)
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "cannot be exported" in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.gguf"))


def _forbid_loading(monkeypatch) -> None:
    """Make every way the export reads a tokenizer, an adapter or a weight fail the test."""
    import safetensors
    import transformers

    import nf4tune.checkpoint.gguf as gguf_in
    import nf4tune.checkpoint.hf as hf
    import nf4tune.models.adapters as adapters
    import nf4tune.models.merge as merge

    def forbidden(*args, **kwargs):
        raise AssertionError("read before the refusal")

    for module, name in [(transformers.AutoTokenizer, "from_pretrained"), (gguf_in, "gguf_tokenizer"),
                         (gguf_in, "iter_gguf_tensors"), (gguf, "dequantize"), (hf, "safe_open"), (merge, "safe_open"),
                         (merge, "iter_tensors"), (adapters, "load_file"), (safetensors, "safe_open")]:
        monkeypatch.setattr(module, name, forbidden)


def test_refusals_come_from_the_config_before_anything_loads(tmp_path, monkeypatch):
    """An HF folder, its 4-bit checkpoint and a .gguf base are refused from their config alone: no tokenizer,
    adapter or tensor is read (each reader made to fail the test), merged or adapter-only."""
    src, _, _ = _case("gemma2", tmp_path, attn_logit_softcapping=None)
    assert main(["quantize", str(src), str(tmp_path / "q4")]) == 0
    phi3, _, _ = build_tiny(tmp_path / "phi3", "phi3", "sentencepiece", **_DECODER)
    export_gguf(phi3, tmp_path / "phi3.gguf", progress=False)
    (tmp_path / "adapter").mkdir()  # never opened: the refusal comes first
    _forbid_loading(monkeypatch)
    for base, kind, expected in [(src, "f16", "attn_logit_softcapping"), (tmp_path / "q4", "f16", "attn_logit_softcapping"),
                                 (tmp_path / "phi3.gguf", "q4_k_m", "Q5_K")]:
        with pytest.raises(Nf4tuneError, match=expected):
            export_gguf(base, tmp_path / "out.gguf", tmp_path / "adapter", kind=kind, progress=False)
    with pytest.raises(Nf4tuneError, match="attn_logit_softcapping"):
        export_adapter_gguf(tmp_path / "q4", tmp_path / "out.gguf", tmp_path / "adapter")
    assert not (tmp_path / "out.gguf").exists()


# Adapter-only GGUF: the LoRA as llama.cpp applies it on the base's own export.

def _adapter(src, root, rank: int = 8, alpha: float = 16, use_rslora: bool = False):
    """A LoRA adapter on every linear layer of the model in `src`, B random (not zero, as at the start of training)."""
    torch.manual_seed(0)
    lora = nf4tune.LoraConfig(r=rank, alpha=alpha, dropout=0.0, use_rslora=use_rslora)
    model, _ = nf4tune.load_model(src, device="cpu", lora=lora, compute_dtype=torch.float32, progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    return nf4tune.save_adapter(model, root / "adapter")


def test_adapter_only_gguf_is_llama_cpps_lora_format(tmp_path):
    """general.type "adapter", adapter.type "lora", adapter.lora.alpha giving the adapter's own factor (alpha * sqrt(r)
    for rank-stabilized LoRA, llama.cpp dividing by r), lora_a / lora_b under llama.cpp's names, B's rows of Q and K in
    llama.cpp's rotary order as the base's weights are; written by `nf4tune export BASE OUT --adapter A --adapter-only`."""
    from nf4tune.checkpoint.gguf_arch import permute_for_llama_cpp
    from nf4tune.models.adapters import read_adapter

    src, _, _ = build_tiny(tmp_path, "llama", "llama-bpe", **_DECODER)
    adapter = _adapter(src, tmp_path, rank=8, alpha=16, use_rslora=True)
    out = tmp_path / "lora.gguf"
    assert main(["export", str(src), str(out), "--adapter", str(adapter), "--adapter-only"]) == 0
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(16 * math.sqrt(8))
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2 and not any(k.startswith("tokenizer") for k in fields)
    _, pairs, _ = read_adapter(adapter)
    q = pairs["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(tensors["blk.1.attn_q.weight.lora_a"], q["A"].half().float())
    torch.testing.assert_close(tensors["blk.1.attn_q.weight.lora_b"], permute_for_llama_cpp(q["B"], 4).half().float())
    k = pairs["model.layers.1.self_attn.k_proj"]
    torch.testing.assert_close(tensors["blk.1.attn_k.weight.lora_b"], permute_for_llama_cpp(k["B"], 2).half().float())
    v = pairs["model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(tensors["blk.1.attn_v.weight.lora_b"], v["B"].half().float())


def test_adapter_only_refusals(tmp_path, capsys):
    src, _, _ = build_tiny(tmp_path, "llama", "llama-bpe", **_DECODER)
    adapter = _adapter(src, tmp_path, rank=4)
    cases = [(["--adapter-only"], "--adapter ADAPTER_DIR"),
             (["--adapter", str(adapter), "--adapter-only", "--type", "q8_0"], "not --type q8_0"),
             (["--adapter", str(adapter), "--adapter-only", "--ollama"], "--ollama applies to a merged export")]
    for flags, expected in cases:
        capsys.readouterr()
        assert main(["export", str(src), str(tmp_path / "a.gguf"), *flags]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    other, _, _ = build_tiny(tmp_path / "other", "llama", "llama-bpe", **dict(_DECODER, hidden_size=128))
    with pytest.raises(Nf4tuneError, match="does not fit"):
        export_adapter_gguf(other, tmp_path / "a.gguf", adapter)
    assert not (tmp_path / "a.gguf").exists()


_ADAPTER_CASES = {  # case: (model_type, tokenizer style, config fields, LoRA rank, alpha, rank-stabilized)
    "llama": ("llama", "llama-bpe", _DECODER, 8, 16, False),
    "llama-rslora": ("llama", "llama-bpe", _DECODER, 8, 16, True),
    "qwen2": ("qwen2", "qwen2", _DECODER, 4, 8, False),
    "granite": _CASES["granite"][:3] + (8, 32, False),
}


@pytest.mark.parametrize("case", list(_ADAPTER_CASES))
def test_llama_cpp_applies_the_adapter_only_gguf_as_the_merged_export(case, tmp_path):
    """The adapter-only GGUF on the base's own GGUF (llama.cpp's --lora) gives the merged export's logits within 1%
    of the largest and the same greedy tokens, and the merged model's (transformers) too; without it llama.cpp
    is far off, so the adapter is what makes them agree. Llama (Q/K rows permuted; also with rank-stabilized
    scaling, all three files f32), Qwen2 (no permutation, biases), Granite (multipliers)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=_LLAMA_CPP_MISSING)
    from transformers import AutoModelForCausalLM

    from nf4tune.models.merge import merge_adapter

    model_type, style, fields, rank, alpha, rslora = _ADAPTER_CASES[case]
    src, tok, _ = build_tiny(tmp_path, model_type, style, **fields)
    adapter = _adapter(src, tmp_path, rank=rank, alpha=alpha, use_rslora=rslora)
    kind = "f32" if rslora else "f16"  # each file type once
    export_gguf(src, tmp_path / "base.gguf", kind=kind, progress=False)
    export_gguf(src, tmp_path / "merged.gguf", adapter, kind=kind, progress=False)
    export_adapter_gguf(src, tmp_path / "lora.gguf", adapter, kind=kind)
    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "lora.gguf").tensors} == {kind.upper()}
    ids = tok(SPLIT_TEXT).input_ids[:16]
    merged, merged_llm = _llama_cpp_logits(llama_cpp, tmp_path / "merged.gguf", ids)
    applied, applied_llm = _llama_cpp_logits(llama_cpp, tmp_path / "base.gguf", ids, lora_path=str(tmp_path / "lora.gguf"))
    base, _ = _llama_cpp_logits(llama_cpp, tmp_path / "base.gguf", ids)
    scale = merged.abs().max()
    assert (applied - merged).abs().max() < 0.01 * scale, (applied - merged).abs().max() / scale
    assert (base - merged).abs().max() > 0.05 * scale
    assert _greedy(applied_llm, ids) == _greedy(merged_llm, ids)
    merge_adapter(src, adapter, tmp_path / "merged-hf", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-hf", dtype=torch.float32).eval()
    ours = _logits(reference, torch.tensor([ids]))[0]
    assert (applied - ours).abs().max() < 0.01 * ours.abs().max()
