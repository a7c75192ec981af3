"""The real SmolLM2-135M-Instruct (Q4_1 GGUF; 30 layers, GQA 9/3 heads, tied embeddings, ChatML) through
nf4tune's public API: load, generate, a few training steps, adapter save/load, merge + GGUF export."""

from __future__ import annotations

import pytest
import torch

import nf4tune

pytestmark = pytest.mark.real_model
gguf = pytest.importorskip("gguf", reason="the real model is a GGUF file: pip install gguf")

# Short sequences keep this fast: a prompt and the one-word answer the model should learn to give.
TRAIN = [("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"),
         ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Cuba", "Havana"), ("Greece", "Athens")]
HELD_OUT = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Russia", "Moscow")]


def _prompt(country: str) -> str:
    return f"Question: What is the capital of {country}?\nAnswer:"


def _greedy(model, tok, prompt: str, n: int = 6) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def _exact(model, tok) -> float:
    """Held-out exact match: the reply is ' <capital>' and then the end-of-text token, nothing more."""
    hits = [_greedy(model, tok, _prompt(c), 4) == f" {cap}{tok.eos_token}" for c, cap in HELD_OUT]
    return sum(hits) / len(hits)


@pytest.fixture(scope="module")
def tuned(smollm2_gguf, tmp_path_factory):
    """SmolLM2 in 4-bit with fresh LoRA adapters, trained for a few steps on one-word answers."""
    torch.manual_seed(0)  # the adapters' start: not whatever the tests before left in the global generator
    model, tok = nf4tune.load_model(smollm2_gguf, device="cpu", lora=nf4tune.LoraConfig(r=8, alpha=16, dropout=0.0),
                                    progress=False)
    before = {"exact": _exact(model, tok), "chat": _chat(model, tok)}
    texts = [f"{_prompt(c)} {cap}{tok.eos_token}" for c, cap in TRAIN]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    adapter = tmp_path_factory.mktemp("real") / "adapter"
    nf4tune.save_adapter(model, adapter)
    return model, tok, adapter, before, losses


def _chat(model, tok) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def test_the_real_model_chats_and_fine_tunes(tuned):
    model, tok, _, before, losses = tuned
    assert "Paris" in before["chat"]  # the 4-bit model still knows its facts, through its own chat template
    assert losses[-1] < losses[0] / 3, losses
    assert before["exact"] == 0  # it answers in sentences before training
    replies = [_greedy(model, tok, _prompt(c), 4) for c, _ in HELD_OUT]
    assert _exact(model, tok) >= 0.75, replies  # and with the capital alone on countries it never trained on after


def test_the_adapter_saves_and_loads_back(tuned, smollm2_gguf):
    model, tok, adapter, _, _ = tuned
    reloaded, tok2 = nf4tune.load_model(smollm2_gguf, device="cpu", adapter=adapter, progress=False)
    ids = tok(_prompt("Chile"), return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert tok2.chat_template == tok.chat_template


def test_merge_and_export_to_gguf_keeps_the_fine_tune(tuned, smollm2_gguf, tmp_path):
    """The adapter merged into the dequantized GGUF weights and exported (f16 and q8_0): transformers'
    GGUF loader reads it back with the trained behaviour, the tokenizer and the chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nf4tune.models.export import export_gguf

    model, tok, adapter, _, _ = tuned
    ids = tok(_prompt("Chile"), return_tensors="pt").input_ids
    with torch.no_grad():
        trained = model(ids).logits.float()
    for kind in ("f16", "q8_0"):
        out = tmp_path / f"smol-{kind}.gguf"
        # Merged into the NF4-dequantized weights it trained against: the clean merge differs from the trained
        # function by the 4-bit error of this small model (measured: 26% of the largest logit).
        export_gguf(smollm2_gguf, out, adapter, kind=kind, ollama=kind == "f16", dequantized=True, progress=False)
        exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name).eval()
        with torch.no_grad():
            logits = exported(ids).logits
        # The trained model computes in bfloat16, transformers in float32 from float16 / 8-bit weights.
        assert (logits - trained).abs().max() < 0.15 * trained.abs().max(), kind
        assert _exact(exported, tok) >= 0.75, kind
    exported_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smol-f16.gguf")
    text = "Héllo wörld, 東京 — добрый день! 🙂"
    assert exported_tok(text).input_ids == tok(text).input_ids and exported_tok.decode(exported_tok(text).input_ids) == text
    assert exported_tok.chat_template == tok.chat_template
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "Modelfile").read_text()


@pytest.mark.parametrize("kind, tolerance", [("f16", 0.01), ("q4_k_m", 0.05)])
def test_llama_cpp_runs_the_exported_fine_tune(tuned, smollm2_gguf, tmp_path, kind, tolerance):
    """llama.cpp itself (llama-cpp-python, optional extra `llamacpp`) loads the exported SmolLM2 fine-tune:
    its tokenizer splits a multilingual text as the model's own does, its logits agree with transformers
    reading the same file (float16 weights: 1% of the largest logit; q4_k_m, where llama.cpp also rounds
    activations to 8 bits in its matmuls: 5%), it generates the same greedy tokens, and it answers the
    held-out questions as the fine-tune does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs `pip install llama-cpp-python` (extra llamacpp)")
    from transformers import AutoModelForCausalLM

    from nf4tune.models.export import export_gguf

    _, tok, adapter, _, _ = tuned
    out = tmp_path / f"smol-{kind}.gguf"
    export_gguf(smollm2_gguf, out, adapter, kind=kind, dequantized=True, progress=False)
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=128, n_threads=2, seed=0)
    text = "Héllo wörld, 東京 — добрый день! 🙂"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name).eval()
    ids = tok(_prompt("Chile"), return_tensors="pt").input_ids
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(llm.scores[: ids.shape[1]])
    with torch.no_grad():
        ours = exported(ids).logits[0]
    assert (theirs - ours).abs().max() < tolerance * ours.abs().max()

    hits = 0
    for country, capital in HELD_OUT:
        prompt = tok(_prompt(country)).input_ids
        llm.reset()
        got = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if token == tok.eos_token_id or len(got) == 4:
                break
            got.append(token)
        expected = _greedy(exported, tok, _prompt(country), 4).removesuffix(tok.eos_token)
        assert tok.decode(got) == expected, country
        hits += tok.decode(got) == f" {capital}"
    assert hits >= 3
