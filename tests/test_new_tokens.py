"""Tokens added to the vocabulary, end to end: their own learning rate, saved as only their rows in
PEFT's `trainable_token_indices` format (PEFT loads them), older whole-matrix adapters still load,
served beside base-vocabulary adapters, merged into a resized checkpoint."""

from __future__ import annotations

import json
import threading

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.train.tokens import add_tokens_to_tokenizer, grow_vocab

BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
NEW = ["<|answer|>", "<|think|>"]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def trained(request, tmp_path_factory):
    """A tiny model with two added tokens whose rows (and LoRA B) are set as training would, saved."""
    root = tmp_path_factory.mktemp("newtok")
    base = build_tiny_checkpoint(root / "base", tie_word_embeddings=request.param)
    model, tok = nf4tune.load_model(base, device="cpu", compute_dtype=torch.bfloat16,
                                    lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
    old = model.get_input_embeddings().weight.shape[0]
    add_tokens_to_tokenizer(tok, [], NEW)
    assert grow_vocab(model, len(tok)) == 2
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
        for m in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            m.weight[old:] += torch.randn(m.weight[old:].shape, generator=gen)
    model.eval()
    adapter = root / "adapter"
    nf4tune.save_adapter(model, adapter)
    tok.save_pretrained(adapter)
    ids = tok("ab<|answer|>cd<|think|>e", return_tensors="pt").input_ids
    assert ids.max() >= old  # the prompt holds the new tokens
    return dict(base=base, adapter=adapter, model=model, old=old, ids=ids, tied=request.param)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _close(a, b, rel=0.03):
    # same 4-bit bits and adapters; bf16 rounding in different matmul kernels remains
    return (a - b).abs().max() <= rel * b.abs().max()


def test_only_the_new_rows_are_saved_in_peft_format(trained):
    tensors = load_file(trained["adapter"] / "adapter_model.safetensors")
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    rows = [trained["old"], trained["old"] + 1]
    deltas = {k: v for k, v in tensors.items() if "lora_" not in k}
    expected = ["base_model.model.lm_head.token_adapter.trainable_tokens_delta",
                "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert sorted(deltas) == expected  # as PEFT writes them (a tied head's rows too)
    hidden = trained["model"].config.hidden_size
    assert all(v.shape == (2, hidden) for v in deltas.values())
    assert config["modules_to_save"] is None
    assert config["trainable_token_indices"] == ({"embed_tokens": rows} if trained["tied"]
                                                 else {"embed_tokens": rows, "lm_head": rows})
    model = trained["model"]
    assert torch.equal(deltas[expected[1]], model.get_input_embeddings().weight[trained["old"]:].float())
    assert torch.equal(deltas[expected[0]], model.get_output_embeddings().weight[trained["old"]:].float())


def test_peft_loads_the_adapter_with_the_same_logits(trained):
    tok = AutoTokenizer.from_pretrained(trained["adapter"])
    base = AutoModelForCausalLM.from_pretrained(trained["base"], quantization_config=BNB, dtype=torch.bfloat16,
                                                device_map="cpu")
    base.resize_token_embeddings(len(tok))  # PEFT's way: resize the base to the adapter's tokenizer, then load
    theirs = peft.PeftModel.from_pretrained(base, trained["adapter"]).eval()
    if trained["tied"]:  # the head stays tied: one set of rows serves both
        head, embed = theirs.get_output_embeddings().token_adapter, theirs.get_input_embeddings().token_adapter
        assert head.trainable_tokens_delta is embed.trainable_tokens_delta and head.tied_adapter is embed
    ours, _ = nf4tune.load_model(trained["base"], device="cpu", compute_dtype=torch.bfloat16, adapter=trained["adapter"])
    a, b = _logits(ours, trained["ids"]), _logits(theirs, trained["ids"])
    assert a.shape[-1] == trained["old"] + 2 and a.shape == b.shape
    assert _close(a, b), (a - b).abs().max()
    assert _close(_logits(trained["model"], trained["ids"]), a, rel=0.01)  # as the model that saved it
    with theirs.disable_adapter():  # the new rows matter: without them PEFT's model is another model
        assert not _close(_logits(theirs, trained["ids"]), b, rel=1e-3)


def test_older_adapters_with_whole_matrices_still_load(trained, tmp_path):
    """nf4tune before PEFT's format saved the whole embedding (and head) as `modules_to_save`."""
    model = trained["model"]
    tensors = {k: v for k, v in load_file(trained["adapter"] / "adapter_model.safetensors").items() if "lora_" in k}
    tensors["base_model.model.model.embed_tokens.weight"] = model.get_input_embeddings().weight.detach().float()
    saved = ["embed_tokens"]
    if not trained["tied"]:
        tensors["base_model.model.lm_head.weight"] = model.get_output_embeddings().weight.detach().float()
        saved.append("lm_head")
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "adapter_model.safetensors")
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    config.update(modules_to_save=saved, trainable_token_indices=None)
    (old / "adapter_config.json").write_text(json.dumps(config))
    again, _ = nf4tune.load_model(trained["base"], device="cpu", compute_dtype=torch.bfloat16, adapter=old)
    new, _ = nf4tune.load_model(trained["base"], device="cpu", compute_dtype=torch.bfloat16, adapter=trained["adapter"])
    assert torch.equal(_logits(again, trained["ids"]), _logits(new, trained["ids"]))


def test_merge_writes_the_grown_vocabulary_and_tokenizer(trained, tmp_path):
    from nf4tune.models.merge import merge_adapter

    out = tmp_path / "merged"
    merge_adapter(trained["base"], trained["adapter"], out, dequantized=True, progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(NEW) == [trained["old"], trained["old"] + 1]
    assert tok("ab<|answer|>cd<|think|>e", return_tensors="pt").input_ids.tolist() == trained["ids"].tolist()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert merged.config.vocab_size == trained["old"] + 2
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == trained["tied"]
    ours, _ = nf4tune.load_model(trained["base"], device="cpu", compute_dtype=torch.bfloat16, adapter=trained["adapter"])
    a, b = _logits(ours, trained["ids"]), _logits(merged, trained["ids"])
    assert a.shape == b.shape and _close(a, b), (a - b).abs().max()


def _alone(base, adapter, prompt, **sampling):
    from nf4tune.serve import Engine

    model, tok = nf4tune.load_model(base, device="cpu", adapter=adapter)
    engine = Engine(model, tok)
    try:
        return engine.generate(prompt, **sampling).text
    finally:
        engine.close()


def test_the_server_holds_an_adapter_with_new_tokens_beside_others(trained, tmp_path):
    openai = pytest.importorskip("openai", reason="the official client is the oracle for the wire format")
    from nf4tune.serve import Engine
    from nf4tune.serve.server import Server

    base = trained["base"]
    plain_model, _ = nf4tune.load_model(base, device="cpu", lora=nf4tune.LoraConfig(r=4, alpha=32, dropout=0.0))
    with torch.no_grad():
        for layer in lora_layers(plain_model).values():
            layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    nf4tune.save_adapter(plain_model, tmp_path / "plain")
    model, tok = nf4tune.load_model(base, device="cpu")
    engine = Engine(model, tok, {"tok": str(trained["adapter"]), "plain": str(tmp_path / "plain")}, max_batch=4)
    server = Server(engine, base_name="base", port=0)
    server.start()
    try:
        host, port = server.address
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0)
        prompt = "ab<|answer|>cd"
        asks = {("tok", 0.0): {}, ("plain", 0.0): {}, ("base", 0.0): {}, ("plain", 1.0): {"seed": 5}}
        got = {}

        def ask(key):
            name, temperature = key
            got[key] = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=temperature,
                                                 **asks[key]).choices[0].text

        threads = [threading.Thread(target=ask, args=(key,)) for key in asks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # each as it is served alone: the added rows for "tok" (its tokenizer encodes <|answer|>), the base
        # vocabulary for the others (they never draw an added token, seeded sampling included)
        assert got[("tok", 0.0)] == _alone(base, trained["adapter"], prompt, max_new_tokens=8, temperature=0.0)
        assert got[("plain", 0.0)] == _alone(base, tmp_path / "plain", prompt, max_new_tokens=8, temperature=0.0)
        assert got[("base", 0.0)] == _alone(base, None, prompt, max_new_tokens=8, temperature=0.0)
        assert got[("plain", 1.0)] == _alone(base, tmp_path / "plain", prompt, max_new_tokens=8, temperature=1.0, seed=5)
    finally:
        server.stop()


def test_one_server_holds_one_adapter_that_adds_tokens(trained):
    from nf4tune.errors import Nf4tuneError
    from nf4tune.models.adapters import AdapterBank

    model, _ = nf4tune.load_model(trained["base"], device="cpu")
    with pytest.raises(Nf4tuneError, match="'a' and 'b' both add tokens.*second server"):
        AdapterBank(model, {"a": trained["adapter"], "b": trained["adapter"]})


def test_added_rows_learn_at_their_own_rate(tmp_path):
    from nf4tune.train.config import TrainingSection, recipe_from_dict
    from nf4tune.train.loop import train
    from nf4tune.train.tokens import DEFAULT_EMBEDDING_LEARNING_RATE, new_token_learning_rate

    base = build_tiny_checkpoint(tmp_path / "base")
    rows = [{"prompt": f"Is {n} even? ", "completion": "<|answer|>" + ("yes" if n % 2 == 0 else "no")} for n in range(32)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, lr, embedding_lr = 3, 1e-4, 1e-2
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(base), "add_special_tokens": ["<|answer|>"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(tmp_path / "train.jsonl"), "source_max_len": 16, "target_max_len": 8},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": steps, "per_device_train_batch_size": 8,
                     "learning_rate": lr, "embedding_learning_rate": embedding_lr, "save_steps": 100}})
    result = train(recipe, progress=False)
    start = nf4tune.load_model(base, device="cpu")[0].get_input_embeddings().weight.float().mean(0)
    loaded, tok = nf4tune.load_model(base, device="cpu", adapter=result.adapter_dir)
    moved = (loaded.get_input_embeddings().weight[tok.convert_tokens_to_ids("<|answer|>")].float() - start).abs().max()
    # Adam moves an element about one learning rate a step: the adapters' rate could not have moved it this far
    assert 10 * steps * lr < moved <= 4 * steps * embedding_lr, moved
    default = TrainingSection(output_dir="x", learning_rate=2e-4)
    assert new_token_learning_rate(default) == DEFAULT_EMBEDDING_LEARNING_RATE > default.learning_rate


@pytest.mark.real_model
def test_the_real_model_learns_to_say_a_new_token(smollm2_gguf, tmp_path):
    """SmolLM2 (tied embeddings): a special token added and used in every answer is generated after a few
    steps with the added rows' own learning rate (with the adapters' alone it reached loss 1.91 and replies
    came back empty), and the adapter saved with it is small and generates it too."""
    pytest.importorskip("gguf", reason="the real model is a GGUF file: pip install gguf")
    from nf4tune.train.config import TrainingSection
    from nf4tune.train.tokens import parameter_groups

    model, tok = nf4tune.load_model(smollm2_gguf, device="cpu", lora=nf4tune.LoraConfig(r=8, alpha=16, dropout=0.0),
                                    progress=False)
    add_tokens_to_tokenizer(tok, [], ["<|answer|>"])
    grow_vocab(model, len(tok))
    answer = tok.convert_tokens_to_ids("<|answer|>")
    pairs = [("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima")]
    texts = [f"Capital of {c}?<|answer|>{cap}{tok.eos_token}" for c, cap in pairs]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(parameter_groups(model, TrainingSection(output_dir="-", learning_rate=2e-3)), lr=2e-3)
    model.train()
    for _ in range(10):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    prompt = tok("Capital of Peru?", return_tensors="pt").input_ids  # a trained question: the answer starts with it

    def first_token(m):
        with torch.no_grad():
            return int(m(prompt).logits[0, -1].argmax())

    assert first_token(model) == answer
    nf4tune.save_adapter(model, tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < lora_bytes + 2**20, (size, lora_bytes)  # the LoRA matrices and two rows, not the 49k x 576 matrix
    loaded, loaded_tok = nf4tune.load_model(smollm2_gguf, device="cpu", adapter=tmp_path / "adapter", progress=False)
    assert loaded_tok.convert_tokens_to_ids("<|answer|>") == answer and first_token(loaded) == answer


def test_export_to_gguf_holds_the_added_tokens(tmp_path):
    pytest.importorskip("gguf", reason="GGUF export: pip install gguf")
    from test_gguf import bpe_tokenizer

    from nf4tune.models.export import export_gguf
    from nf4tune.models.merge import merge_adapter

    tok = bpe_tokenizer()
    src = build_tiny_checkpoint(tmp_path / "src", dtype=torch.float32, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    tok.save_pretrained(src)
    model, _ = nf4tune.load_model(src, device="cpu", lora=nf4tune.LoraConfig(r=4, dropout=0.0), progress=False)
    add_tokens_to_tokenizer(tok, [], NEW)
    grow_vocab(model, len(tok))
    with torch.no_grad():
        model.get_input_embeddings().weight[-2:] += torch.randn(2, model.config.hidden_size,
                                                                generator=torch.Generator().manual_seed(0))
    nf4tune.save_adapter(model, tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    merge_adapter(src, tmp_path / "adapter", tmp_path / "merged", progress=False)
    out = tmp_path / "m.gguf"
    export_gguf(src, out, tmp_path / "adapter", kind="f16", progress=False)

    read = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name).eval()
    read_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "hello<|answer|> world<|think|>"
    ids = tok(text, return_tensors="pt").input_ids
    assert read_tok(text).input_ids == ids[0].tolist() and ids.max() == len(tok) - 1  # the added tokens, as trained
    assert read.get_input_embeddings().weight.shape[0] == len(tok)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():  # the file's float16 matrices
        for p in merged.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    torch.testing.assert_close(_logits(read, ids), _logits(merged, ids), rtol=0, atol=1e-5)
