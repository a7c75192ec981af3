"""GGUF files in (`load_model` on a .gguf) and out (`nf4tune export`), against transformers' GGUF loader."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.cli.main import main
from nf4tune.layers.linear4bit import Linear4bit
from nf4tune.layers.lora import lora_layers
from nf4tune.models.export import export_gguf
from nf4tune.models.merge import merge_adapter

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install gguf)")

MULTILINGUAL = "Héllo wörld, 東京 — добрый день! 🙂 ¿Qué tal?\n\tnumbers 12345"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def bpe_tokenizer(pre_tokenizer=None):
    """A small byte-level BPE tokenizer (GPT-2 style unless another pre-tokenizer is given), with merges and
    ChatML special tokens, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # With another pre-tokenizer, merges are learnt across every boundary (bytes only, no split) and the
    # pre-tokenizer is set afterwards, so the vocabulary holds merges that only the right split forbids.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer is None)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 3, "hello world, hello there", MULTILINGUAL,
                             SPLIT_TEXT],
                            trainer)
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="module")
def tiny_bpe_llama(tmp_path_factory):
    """A tiny random Llama (GQA: 4 query / 2 key-value heads) with a byte-level BPE tokenizer, and a LoRA adapter."""
    root = tmp_path_factory.mktemp("tiny")
    tok = bpe_tokenizer()
    src = build_tiny_checkpoint(root / "src", dtype=torch.float32, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(src)
    torch.manual_seed(0)  # LoRA A's start: not whatever the tests before left in the global generator
    model, _ = nf4tune.load_model(src, device="cpu", lora=nf4tune.LoraConfig(r=4, dropout=0.0), progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    nf4tune.save_adapter(model, root / "adapter")
    merge_adapter(src, root / "adapter", root / "merged", progress=False)
    return root


def _read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_export_f16_reads_back_as_the_merged_model_in_float16(tiny_bpe_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_bpe_llama / "src"), str(out), "--adapter", str(tiny_bpe_llama / "adapter")]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()  # as a plain open() makes it
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial files left
    model, tok = _read_back(out)
    merged = AutoModelForCausalLM.from_pretrained(tiny_bpe_llama / "merged", dtype=torch.float32).eval()
    # The merged model with its matrices rounded to float16, as the file stores them (norms stay float32).
    with torch.no_grad():
        for p in merged.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    ids = tok(MULTILINGUAL, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(model, ids), _logits(merged, ids), rtol=0, atol=1e-5)
    # The adapter changed the function: the base model gives other logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_bpe_llama / "src", dtype=torch.float32).eval()
    assert (_logits(base, ids) - _logits(merged, ids)).abs().max() > 1e-3


def test_export_qwen2_with_attention_biases(tmp_path):
    """Qwen2 (biases on q/k/v, no rotary row permutation in llama.cpp) reads back as itself in float16."""
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    src = build_tiny_checkpoint(tmp_path / "src", arch="qwen2", dtype=torch.float32, max_shard_size=None, vocab_size=len(tok),
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(src)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in original.named_parameters():
            p.add_(torch.randn_like(p) * 0.05) if name.endswith("bias") else None  # random, not zero, biases
            if p.dim() == 2:
                p.copy_(p.half().float())
    original.save_pretrained(src)
    export_gguf(src, tmp_path / "out" / "q.gguf", progress=False)
    exported, _ = _read_back(tmp_path / "out" / "q.gguf")
    ids = tok(MULTILINGUAL, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(exported, ids), _logits(original, ids), rtol=0, atol=1e-5)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_keeps_the_tokenizer_and_chat_template(tiny_bpe_llama, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    export_gguf(tiny_bpe_llama / "src", out, progress=False)
    _, tok = _read_back(out)
    original = AutoTokenizer.from_pretrained(tiny_bpe_llama / "src")
    assert tok(MULTILINGUAL).input_ids == original(MULTILINGUAL).input_ids
    assert tok.decode(tok(MULTILINGUAL).input_ids) == MULTILINGUAL
    assert tok.chat_template == CHATML
    assert tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages, tokenize=False)


def test_q8_0_and_q4_0_through_the_gguf_quantizers(tiny_bpe_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tiny_bpe_llama / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 71, 90, 200, 33, 64, 12]])
    reference = _logits(merged, ids)
    errors = {}
    for kind in ("q8_0", "q4_0"):
        out = tmp_path / f"{kind}.gguf"
        export_gguf(tiny_bpe_llama / "src", out, tiny_bpe_llama / "adapter", kind=kind, progress=False)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
        errors[kind] = (_logits(_read_back(out)[0], ids) - reference).abs().max() / reference.abs().max()
    # Stated tolerances (random weights, the hard case; measured 1.2-2.0% and about 10x that): 8-bit blocks within 3%
    # of the largest logit, 4-bit within 30%, and 8-bit much the closer.
    assert errors["q8_0"] < 0.03 and errors["q4_0"] < 0.3 and errors["q8_0"] < errors["q4_0"] / 3, errors


def _llama_cpp_test_rows(n_rows: int = 128):  # -> numpy.ndarray (numpy imported only where used)
    """llama.cpp's own quantizer test data (tests/test-quantize-fns.cpp): 0.1 + 2 cos(i), as rows of 256."""
    import numpy as np

    return (0.1 + 2 * np.cos(np.arange(n_rows * 256, dtype=np.float64))).astype(np.float32).reshape(n_rows, 256)


@pytest.mark.parametrize("kind, max_rel_rms", [("Q4_K", 0.08), ("Q6_K", 0.02)])
def test_k_quants_read_back_through_the_gguf_dequantizers(kind, max_rel_rms):
    """nf4tune's Q4_K / Q6_K bytes, read by the gguf package's own dequantizers (those transformers uses).

    Tolerance as RMS error relative to the weights' RMS, for Gaussian weights (what trained matrices look
    like block by block): a uniform grid of step s errs by s/sqrt(12); 32 Gaussians span about 4.1 sigma, so
    Q4_K's 15 steps per sub-block give 0.079 sigma, and Q6_K's symmetric 64 levels over 16 weights (largest
    about 1.8 sigma) 0.016 sigma plus its 8-bit sub-scales; llama.cpp's least-squares search lands just under
    these (measured 0.072 and 0.018). Also llama.cpp's own acceptance check on its test data
    (test-quantize-fns: sqrt(sum of squared errors) / n < 0.002), and Q4_K beats the plain Q4_0."""
    import numpy as np

    from nf4tune.checkpoint.gguf_quants import quantize

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32) * 0.02
    x[0] = 0  # an all-zero super-block dequantizes to zeros
    x[1, :256] = 0.005  # a constant one to a constant
    y = gguf.quants.dequantize(quantize(x, kind), qtype)
    assert y.shape == x.shape and not y[0].any()
    rel_rms = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel_rms < max_rel_rms, rel_rms
    assert np.abs(y[1, :256] - 0.005).max() < 0.005 * 0.03
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
    assert rel_rms < np.sqrt(((q4_0 - x) ** 2).mean() / (x ** 2).mean())
    data = _llama_cpp_test_rows()
    back = gguf.quants.dequantize(quantize(data, kind), qtype)
    assert np.sqrt(((back - data) ** 2).sum()) / data.size < 0.002


def test_q4_k_m_picks_llama_cpps_types_per_tensor():
    """llama.cpp's Q4_K_M mix (llama_tensor_get_type): with 8 layers, attn_v and ffn_down of layers 0, 3, 6, 7
    in Q6_K; the output (or the tied embedding) in Q6_K; rows not a multiple of 256 fall back."""
    from nf4tune.checkpoint.gguf_quants import q4_k_m_type

    six = [i for i in range(8) if q4_k_m_type(f"blk.{i}.ffn_down.weight", 8, 512, True) == "Q6_K"]
    assert six == [0, 3, 6, 7]
    assert q4_k_m_type("blk.3.attn_v.weight", 8, 512, True) == "Q6_K"
    assert [i for i in range(4) if q4_k_m_type(f"blk.{i}.attn_v.weight", 4, 512, True) == "Q6_K"] == [2, 3]
    assert q4_k_m_type("blk.3.attn_q.weight", 8, 512, True) == "Q4_K"
    assert q4_k_m_type("output.weight", 8, 512, True) == "Q6_K"
    assert q4_k_m_type("token_embd.weight", 8, 512, True) == "Q4_K"
    assert q4_k_m_type("token_embd.weight", 8, 512, False) == "Q6_K"
    assert q4_k_m_type("token_embd.weight", 8, 576, False) == "Q8_0"
    assert q4_k_m_type("blk.1.ffn_up.weight", 8, 576, True) == "Q5_0"


def test_export_q4_k_m_reads_back_through_transformers(tmp_path):
    """A tiny Llama whose rows fill 256-weight super-blocks, exported --type q4_k_m and read by transformers'
    GGUF loader: the mix of types in the file, every weight within the k-quant tolerance above, and logits
    within 30% of the largest (as q4_0; random weights, the hard case) and closer than q4_0's."""
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    src = build_tiny_checkpoint(tmp_path / "src", dtype=torch.float32, vocab_size=len(tok), hidden_size=256,
                                intermediate_size=256, num_hidden_layers=4, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_shard_size=None)
    tok.save_pretrained(src)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 71, 90, 200, 33, 64, 12]])
    expected = _logits(reference, ids)
    errors, states = {}, {}
    for kind in ("q4_k_m", "q4_0"):
        out = tmp_path / f"{kind}.gguf"
        assert main(["export", str(src), str(out), "--type", kind]) == 0
        model, _ = _read_back(out)
        errors[kind] = (_logits(model, ids) - expected).abs().max() / expected.abs().max()
        states[kind] = model.state_dict()
    reader = gguf.GGUFReader(tmp_path / "q4_k_m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # With 4 layers llama.cpp's use_more_bits picks layers 2 and 3.
    assert types["output.weight"] == types["blk.2.attn_v.weight"] == types["blk.3.ffn_down.weight"] == "Q6_K"
    assert types["blk.1.attn_v.weight"] == types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    for key, w in reference.state_dict().items():
        rel_rms = ((states["q4_k_m"][key] - w).pow(2).mean() / w.pow(2).mean()).sqrt()
        assert rel_rms < 0.08 if w.dim() == 2 else rel_rms == 0, key
    assert errors["q4_k_m"] < 0.3 and errors["q4_k_m"] < errors["q4_0"], errors


def test_unsupported_types_and_tokenizers_are_refused_with_a_sentence(tiny_bpe_llama, tmp_path, capsys):
    assert main(["export", str(tiny_bpe_llama / "src"), str(tmp_path / "k.gguf"), "--type", "q4_k_s"]) == 2
    assert "llama-quantize" in capsys.readouterr().err
    # The demo model's character-level (WordLevel) tokenizer has no GGUF form: refused, nothing left behind.
    assert main(["export", "tiny-random:llama-demo", str(tmp_path / "demo.gguf")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gguf_in_then_out_gives_the_same_tensors(tiny_bpe_llama, tmp_path):
    first, second = tmp_path / "a" / "first.gguf", tmp_path / "b" / "second.gguf"
    export_gguf(tiny_bpe_llama / "src", first, progress=False)
    export_gguf(first, second, progress=False)
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and bytes(ta.data) == bytes(tb.data), ta.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.attention.head_count_kv"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


def test_tiny_gguf_loads_as_transformers_reads_it_quantized_by_nf4tune(tiny_bpe_llama, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(tiny_bpe_llama / "src", out, kind="q8_0", progress=False)
    model, tok = nf4tune.load_model(tmp_path, device="cpu", compute_dtype=torch.float32, progress=False)  # the folder
    assert_same_as_quantized_oracle(model, _transformers_gguf_model(out).state_dict(), torch.float32)
    assert tok(MULTILINGUAL).input_ids == bpe_tokenizer()(MULTILINGUAL).input_ids


def test_quantize_and_merge_take_a_gguf_base(tiny_bpe_llama, tmp_path):
    """`nf4tune quantize` and `merge` on a GGUF file write checkpoints with the GGUF's tokenizer, and the
    4-bit checkpoint is the model load_model makes of the GGUF directly."""
    gguf_file = tmp_path / "m.gguf"
    export_gguf(tiny_bpe_llama / "src", gguf_file, progress=False)
    assert main(["quantize", str(gguf_file), str(tmp_path / "q")]) == 0
    assert main(["merge", str(gguf_file), str(tiny_bpe_llama / "adapter"), str(tmp_path / "merged")]) == 0
    for out in ("q", "merged"):
        assert sorted(p.name for p in (tmp_path / out).iterdir() if p.name.startswith("tokenizer")) == \
            ["tokenizer.json", "tokenizer_config.json"], out
    direct, tok = nf4tune.load_model(gguf_file, device="cpu", compute_dtype=torch.float32, progress=False)
    via_bnb, _ = nf4tune.load_model(tmp_path / "q", device="cpu", compute_dtype=torch.float32, progress=False)
    ids = tok(MULTILINGUAL, return_tensors="pt").input_ids
    assert torch.equal(_logits(direct, ids), _logits(via_bnb, ids))


def test_llama_cpp_loads_the_export_and_agrees(tiny_bpe_llama, tmp_path):
    """llama.cpp itself (the llama-cpp-python package, optional extra `llamacpp`): same logits and greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs `pip install llama-cpp-python` (extra llamacpp)")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.gguf"
    export_gguf(tiny_bpe_llama / "src", out, tiny_bpe_llama / "adapter", progress=False)
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=64)
    ids = [5, 70, 71, 90, 200, 33]
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    merged = AutoModelForCausalLM.from_pretrained(tiny_bpe_llama / "merged", dtype=torch.float32).eval()
    ours = _logits(merged, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < 0.01 * ours.abs().max()
    expected = merged.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    llm.reset()
    got = [t for _, t in zip(range(5), llm.generate(ids, temp=0.0, top_k=1))]
    assert got == expected


# Each pre-tokenizer style nf4tune names for llama.cpp, and what it must split alike: digit runs,
# contractions in both cases, newlines, punctuation, and text outside Latin script.
SPLIT_TEXT = "I'LL pay 12345 or 7,5 — we'd've said so.\n\n  Tabs\there! 東京 добрый день"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(style: str):
    from tokenizers import Regex, pre_tokenizers

    if style == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    pattern = _LLAMA3_SPLIT if style == "llama-bpe" else _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def sentencepiece_tokenizer(space_prefix: bool = True):
    """A small BPE with byte fallback as Llama 2's and Mistral's tokenizer.json are (spaces as "▁", one in
    front, 256 <0xXX> byte tokens): merges learnt on text written that way, then the vocabulary rebuilt
    over the special and byte tokens. Without `space_prefix`, no "▁" in front, as Gemma's."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, hello there", MULTILINGUAL, SPLIT_TEXT]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    learner.train_from_iterator(["▁" + t.replace(" ", "▁") for t in texts],
                                trainers.BpeTrainer(vocab_size=400, show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * space_prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * space_prefix)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.mark.parametrize("style", ["gpt-2", "smollm", "llama-bpe", "qwen2", "sentencepiece", "sentencepiece-no-prefix"])
def test_llama_cpp_splits_text_as_the_tokenizer_does(style, tmp_path):
    """The exported vocabulary and pre-tokenizer name make llama.cpp tokenize as transformers does (GPT-2,
    SmolLM, Llama 3 and Qwen2 splits; SentencePiece-style BPE with byte fallback, with a "▁" in front as
    Llama 2's or without as Gemma's), read from the file's vocabulary alone."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs `pip install llama-cpp-python` (extra llamacpp)")

    tok = _tokenizer_of_style(style)
    style = style.removesuffix("-no-prefix")
    src = build_tiny_checkpoint(tmp_path / "src", dtype=torch.float32, vocab_size=len(tok), num_hidden_layers=1,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(src)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, None, progress=False)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == ("llama" if style == "sentencepiece" else "gpt2")
    assert fields["tokenizer.ggml.pre"].contents() == ("default" if style == "sentencepiece" else style)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in (SPLIT_TEXT, MULTILINGUAL):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids, text


def _transformers_gguf_model(gguf_file):
    """The oracle: transformers' own GGUF loader (it dequantizes every tensor to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).eval()


def assert_same_as_quantized_oracle(model, oracle_state: dict, dtype: torch.dtype) -> None:
    """Every 4-bit weight of `model` is nf4tune's quantization of the oracle's tensor, byte for byte, and
    every other tensor is the oracle's cast to `dtype`."""
    linears = {name for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert linears, "no 4-bit layers"
    for name in linears:
        q = model.get_submodule(name).quantized_weight
        expected = nf4tune.quantize(oracle_state[f"{name}.weight"], "nf4", 64, True)
        got, want = q.bnb_state_dict("w"), expected.bnb_state_dict("w")
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
    for key, param in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in linears or key not in oracle_state or "lora" in key:
            continue
        assert torch.equal(param, oracle_state[key].to(dtype)), key


def _save_as_safetensors(model, folder) -> None:
    """A transformers model's state as a plain checkpoint folder (its tied head left out, as transformers does)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, str(folder / "model.safetensors"))
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.real_model
def test_real_gguf_loads_as_transformers_reads_it_quantized_by_nf4tune(smollm2_gguf, tmp_path):
    """The Q4_1 SmolLM2 file: tensors, config and tokenizer as transformers builds them, then NF4."""
    model, tokenizer = nf4tune.load_model(smollm2_gguf, device="cpu", compute_dtype=torch.bfloat16, progress=False)
    oracle = _transformers_gguf_model(smollm2_gguf)
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert_same_as_quantized_oracle(model, oracle.state_dict(), torch.bfloat16)

    # Logits bit for bit against nf4tune loading transformers' dequantized weights from safetensors.
    _save_as_safetensors(oracle, tmp_path / "oracle")
    del oracle
    reference, _ = nf4tune.load_model(tmp_path / "oracle", device="cpu", compute_dtype=torch.bfloat16, progress=False)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # A folder holding the .gguf is the same model.
    assert nf4tune.load_model(smollm2_gguf.parent, device="cpu", progress=False)[0].config.num_hidden_layers == 30


# Per case: the family, the tokenizer style its models ship (SentencePiece-style BPE or a byte-level BPE
# split) and config overrides that exercise what llama.cpp must be told: a head_dim other than hidden / heads
# (Qwen3, Gemma: attention.key_length; Qwen3's is 128 as in every real Qwen3, because transformers' GGUF
# reader ignores key_length for qwen3 and assumes its default 128), Gemma's head tied to the embedding
# (llama.cpp's gemma has no other), and a Phi-4-mini-like Phi-3 (rotary on 3/4 of each head, tied head).
_FAMILY_CASES = {
    "mistral": ("mistral", "sentencepiece", {}),
    "qwen2": ("qwen2", "qwen2", {}),
    "qwen3": ("qwen3", "qwen2", {"head_dim": 128}),
    "gemma": ("gemma", "sentencepiece-no-prefix", {"head_dim": 32, "tie_word_embeddings": True}),
    "phi3": ("phi3", "sentencepiece", {}),
    "phi3-partial-rotary-tied": ("phi3", "sentencepiece", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True}),
}


def _tokenizer_of_style(style: str):
    if style.startswith("sentencepiece"):
        return sentencepiece_tokenizer(space_prefix=style == "sentencepiece")
    return bpe_tokenizer(_pre_tokenizer(style))


def _tiny_family(case, tmp_path):
    """A tiny random model of `case` (see _FAMILY_CASES) with its tokenizer, made hard to export by accident:
    random biases and RMSNorm weights (Gemma's stored as w for a scale of 1 + w), attention made
    position-dependent (Q/K, or Qwen3's q_norm / k_norm that follow them, scaled up) so a wrong rotary layout
    shows in the logits, and every matrix rounded to float16 as an f16 file stores it. Returns (folder,
    tokenizer, the model in float32)."""
    from transformers import AutoModelForCausalLM

    arch, style, overrides = _FAMILY_CASES[case]
    tok = _tokenizer_of_style(style)
    src = build_tiny_checkpoint(tmp_path / "src", arch=arch, dtype=torch.float32, max_shard_size=None, vocab_size=len(tok),
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                **overrides)
    tok.save_pretrained(src)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(12)  # attention that depends on position (for phi3 v is scaled too: harmless)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(2)  # Qwen3 normalizes q and k per head after the projection: scale after the norm
            if p.dim() == 2:
                p.copy_(p.half().float())
    original.save_pretrained(src)
    return src, tok, original


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_export_new_families_read_back_through_transformers(arch, tmp_path):
    """Qwen3 (q_norm / k_norm, head_dim 128 with hidden 64 / 4 heads) and Phi-3 (fused qkv_proj and gate_up_proj)
    exported as f16 and read by transformers' GGUF loader: the model itself (matrices in float16). transformers
    has no reader for llama.cpp's gemma; llama.cpp checks that family below."""
    src, tok, original = _tiny_family(arch, tmp_path)
    out = tmp_path / "out" / f"{arch}.gguf"
    export_gguf(src, out, progress=False)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ({"blk.0.attn_qkv.weight"} if arch == "phi3" else {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}) <= names
    exported, _ = _read_back(out)
    ids = tok(MULTILINGUAL, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(exported, ids), _logits(original, ids), rtol=0, atol=1e-5)


def test_exports_llama_cpp_cannot_run_are_refused_with_a_sentence(tmp_path, capsys):
    """Gemma with an untied head (llama.cpp's gemma reads the head from the embedding), Qwen3 with attention
    biases, Mistral with dynamic rope scaling, Phi-3 at q4_k_m, Qwen2 with a yarn attention factor, and T5
    (no llama.cpp decoder graph): one sentence each, no file."""
    cases = {
        "gemma": (dict(tie_word_embeddings=False), "untied"),
        "qwen3": (dict(attention_bias=True), "attention_bias"),
        "mistral": (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                    "'dynamic' rope scaling"),
        # llama.cpp always scales yarn's attention by 1 + 0.1 ln(factor): another attention_factor is refused.
        "qwen2": (dict(rope_parameters={**_YARN_ROPE, "attention_factor": 1.5}), "sets attention_factor"),
    }
    for arch, (overrides, expected) in cases.items():
        src = build_tiny_checkpoint(tmp_path / arch, arch=arch, dtype=torch.float32, max_shard_size=None,
                                    **{**_FAMILY_CASES[arch][2], **overrides})
        capsys.readouterr()  # the build's progress bars
        assert main(["export", str(src), str(tmp_path / f"{arch}.gguf")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    # Phi-3 at q4_k_m: llama.cpp's mix has its fused attn_qkv in Q5_K, a type nf4tune cannot make.
    phi3 = build_tiny_checkpoint(tmp_path / "phi3-ok", arch="phi3", dtype=torch.float32, max_shard_size=None)
    capsys.readouterr()
    assert main(["export", str(phi3), str(tmp_path / "phi3.gguf"), "--type", "q4_k_m"]) == 2
    assert "llama-quantize" in capsys.readouterr().err
    from nf4tune.checkpoint.gguf_arch import ExportPlan
    from nf4tune.errors import Nf4tuneError

    with pytest.raises(Nf4tuneError, match="'t5' models to GGUF is not supported"):
        ExportPlan.for_config({"model_type": "t5", "num_hidden_layers": 2})
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("case", list(_FAMILY_CASES))
def test_llama_cpp_runs_each_exported_family(case, tmp_path):
    """Mistral (SentencePiece-style vocabulary, rotary rows permuted for llama.cpp), Qwen2 (q/k/v biases, its own
    split, no permutation), Qwen3 (q_norm / k_norm, attention.key_length), Gemma (norms stored as 1 + w, the head
    tied to the embedding) and Phi-3 (fused qkv and gate/up; also rotary on part of each head, as Phi-4-mini),
    exported as f16 and run by llama.cpp: logits
    within 1% of the largest of the model's own (its matrices rounded to float16 first) and the same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs `pip install llama-cpp-python` (extra llamacpp)")

    src, tok, original = _tiny_family(case, tmp_path)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, None, progress=False)
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=64)
    ids = tok(SPLIT_TEXT).input_ids[:16]
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    ours = _logits(original, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < 0.01 * ours.abs().max()
    expected = original.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    llm.reset()
    assert [t for _, t in zip(range(5), llm.generate(ids, temp=0.0, top_k=1))] == expected



# Rope-scaled models: Llama 3.1 / 3.2 / 3.3's "llama3" (a rope_freqs tensor; llama.cpp's llama graph only), "linear"
# and "yarn" (rope.scaling metadata; Qwen2.5 / Qwen3's long-context setting). A 16-wide head has 8 rotary
# frequencies; with original_max_position_embeddings 32, llama3 leaves the fastest alone, smooths the next
# (wavelength 20, between 32/4 and 32) and divides the other six by 8, and yarn ramps over the first 3, so the
# scaling changes the logits at every position.
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
_YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
_ROPE_CASES = {  # case: (arch, tokenizer style, rope_parameters[, other config fields])
    "llama-llama3": ("llama", "llama-bpe", _LLAMA3_ROPE),
    "llama-linear": ("llama", "llama-bpe", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama-yarn": ("llama", "llama-bpe", _YARN_ROPE),
    "qwen2-yarn": ("qwen2", "qwen2", _YARN_ROPE),
    "qwen2-linear": ("qwen2", "qwen2", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "qwen3-yarn": ("qwen3", "qwen2", _YARN_ROPE),
    # Phi-3's longrope: per-frequency divisors, the long ones beyond 32 positions (the 40-token prompt, and
    # llama.cpp's context, at least 256), and an attention factor sqrt(1 + ln 4 / ln 32). Phi3Config's own
    # original_max_position_embeddings (4096 by default) overrides the one in rope_parameters, so both say 32.
    "phi3-longrope": ("phi3", "sentencepiece", {"rope_type": "longrope", "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 32,
                                                "short_factor": [1.0, 1.1, 1.3, 1.5, 2.0, 2.5, 3.0, 3.5],
                                                "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]},
                      {"original_max_position_embeddings": 32}),
    # Phi-4-mini's shape: longrope on 3/4 of each head (6 factors), the head tied to the embedding.
    "phi3-partial-longrope": ("phi3", "sentencepiece", {"rope_type": "longrope", "rope_theta": 10000.0,
                                                        "original_max_position_embeddings": 32, "partial_rotary_factor": 0.75,
                                                        "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0],
                                                        "long_factor": [1.0, 2.0, 3.0, 5.0, 8.0, 12.0]},
                              {"original_max_position_embeddings": 32, "partial_rotary_factor": 0.75,
                               "tie_word_embeddings": True}),
}


def _tiny_rope_model(case: str, tmp_path):
    """A tiny model of _ROPE_CASES[case], made as _tiny_family makes its models (Q/K x12 so attention depends on
    position; matrices rounded to float16); 128 positions, 4x the pre-extension 32."""
    arch, style, rope, *extra = _ROPE_CASES[case]
    overrides = {**_FAMILY_CASES.get(arch, ("", "", {}))[2], "rope_parameters": dict(rope), "max_position_embeddings": 128,
                 **(extra[0] if extra else {})}
    _FAMILY_CASES["rope-case"] = (arch, style, overrides)
    try:
        return _tiny_family("rope-case", tmp_path)
    finally:
        del _FAMILY_CASES["rope-case"]


def test_llama3_rope_factors_are_transformers_own():
    """rope_freqs divides each default frequency into transformers' Llama 3 one (1 fast, smoothed, 8 slow)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nf4tune.checkpoint.gguf_arch import llama3_rope_factors

    config = dict(model_type="llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                  rope_parameters=dict(_LLAMA3_ROPE))
    factors = llama3_rope_factors(config)
    default = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.for_model(**config), "cpu")
    assert factors.dtype == torch.float32 and factors.shape == (8,)
    torch.testing.assert_close((default / factors.double()).float(), scaled, rtol=1e-6, atol=0)
    assert factors[0] == 1 and 1 < factors[1] < 8 and (factors[2:] == 8).all()


def test_rope_scaling_is_written_as_llama_cpps_converter_writes_it(tmp_path, caplog):
    """llama3: a float32 rope_freqs tensor of transformers' factors and no scaling keys; yarn: rope.scaling type,
    factor and original context. (transformers' GGUF reader reads neither back: it loads these files with plain
    rope, so llama.cpp is the check of the logits, above; loading such a file as a base says so.)"""
    import logging

    from nf4tune.checkpoint.gguf import gguf_config
    from nf4tune.checkpoint.gguf_arch import llama3_rope_factors

    for case in ("llama-llama3", "qwen2-yarn"):
        src, _, original = _tiny_rope_model(case, tmp_path / case)
        out = tmp_path / case / "m.gguf"
        export_gguf(src, out, None, progress=False)
        reader = gguf.GGUFReader(out)
        arch = _ROPE_CASES[case][0]
        keys = {k: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.rope.scaling")}
        freqs = {t.name: t for t in reader.tensors}.get("rope_freqs.weight")
        if case == "llama-llama3":
            assert keys == {} and freqs.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(freqs.data.copy()), llama3_rope_factors(original.config.to_dict()))
        else:
            assert freqs is None
            assert keys == {f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": 4.0,
                            f"{arch}.rope.scaling.original_context_length": 32}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nf4tune"):
            gguf_config(out)
        assert "rope scaling" in caplog.text and ("rope_freqs" if case == "llama-llama3" else "yarn") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nf4tune"):  # a file without rope scaling: no warning
        export_gguf(_tiny_family("qwen2", tmp_path / "plain")[0], tmp_path / "plain.gguf", None, progress=False)
        gguf_config(tmp_path / "plain.gguf")
    assert "rope scaling" not in caplog.text


@pytest.mark.parametrize("case", list(_ROPE_CASES))
def test_llama_cpp_runs_rope_scaled_models(case, tmp_path):
    """Llama with llama3 rope scaling (rope_freqs tensor), Llama / Qwen2 / Qwen3 with linear or yarn scaling
    (metadata), Phi-3 with longrope (long / short factor tensors, attention factor), exported as f16 and run by
    llama.cpp on a 40-token prompt: logits within 1% of the largest of the model's own (matrices rounded to
    float16 first) and the same greedy tokens; the same model without scaling is far off, so the scaling is what
    makes them agree."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs `pip install llama-cpp-python` (extra llamacpp)")
    from transformers import AutoModelForCausalLM

    src, tok, original = _tiny_rope_model(case, tmp_path)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, None, progress=False)
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=64)
    ids = tok(" ".join([SPLIT_TEXT] * 3)).input_ids[:40]
    assert len(ids) == 40
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    ours = _logits(original, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < 0.01 * ours.abs().max()
    unscaled_config = original.config.to_dict()
    unscaled_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    unscaled = AutoModelForCausalLM.from_pretrained(src, config=type(original.config).from_dict(unscaled_config)).eval()
    assert (_logits(unscaled, torch.tensor([ids]))[0] - ours).abs().max() > 0.05 * ours.abs().max()
    expected = original.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    llm.reset()
    assert [t for _, t in zip(range(5), llm.generate(ids, temp=0.0, top_k=1))] == expected
