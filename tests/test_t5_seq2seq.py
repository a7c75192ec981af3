"""T5 trained as an encoder-decoder: the source to the encoder, the target (+ eos) as the decoder's labels,
each side cut and padded on its own; exact match compares the decoder's generation only."""

import json
import math

import pytest
import torch

import nf4tune
from nf4tune import Nf4tuneError
from nf4tune.checkpoint.tiny import build_tiny_checkpoint, char_tokenizer
from nf4tune.evaluate.exact_match import exact_match_accuracy, generated_tokens
from nf4tune.train import loop as loop_mod
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.data import IGNORE_INDEX, Tokenized, collate, load_examples
from nf4tune.train.evaluation import exact_match
from nf4tune.train.loop import train

# Lower-case sources, upper-case targets: no target token can reach the encoder unnoticed. The targets'
# lengths differ, so micro-batches hold different numbers of target tokens.
SOURCES = ["cat", "dog", "sun", "red", "box", "cup"]
TARGETS = ["XY", "QZW", "K", "JVX", "ZX", "KQYW"]
MAPPING = dict(zip(SOURCES, TARGETS))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny T5 (one layer each side, no dropout so a few steps learn) and the mapping as training rows."""
    root = tmp_path_factory.mktemp("t5")
    model = build_tiny_checkpoint(root / "model", arch="t5", dtype=torch.float32, max_shard_size=None, d_model=32,
                                  d_kv=8, num_heads=4, d_ff=64, num_layers=1, dropout_rate=0.0)
    data = root / "mapping.jsonl"
    data.write_text("".join(json.dumps({"prompt": s, "completion": t}) + "\n" for s, t in MAPPING.items()))
    return root, model, data


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _recipe(model, data, out, steps, eval_path=None, accumulation=1, **data_section):
    return recipe_from_dict({
        "model": {"name_or_path": str(model), "compute_dtype": "float32", "gradient_checkpointing": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "source_max_len": 16, "target_max_len": 8, **data_section},
        "eval": {"path": str(eval_path), "exact_match": True, "per_device_eval_batch_size": 6} if eval_path else {},
        "training": {"output_dir": str(out), "max_steps": steps, "gradient_accumulation_steps": accumulation,
                     "per_device_train_batch_size": len(SOURCES) // accumulation,
                     "learning_rate": 1e-2, "optim": "adamw_torch", "logging_steps": 1, "save_steps": 1000,
                     "eval_steps": steps, "seed": 0},
    })


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _record_forwards(monkeypatch) -> dict:
    """What every forward of the trained model is given: the model's, the encoder's and the decoder's
    tensor keyword arguments, and the model's own loss."""
    seen = {"model": [], "encoder": [], "decoder": [], "loss": []}
    real_load = loop_mod.load_model

    def load_and_watch(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        seen["module"] = model

        def keep(name):
            def hook(module, args, kwargs):
                seen[name].append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            return hook

        model.register_forward_pre_hook(keep("model"), with_kwargs=True)
        model.encoder.register_forward_pre_hook(keep("encoder"), with_kwargs=True)
        model.decoder.register_forward_pre_hook(keep("decoder"), with_kwargs=True)
        model.register_forward_hook(lambda module, args, out: seen["loss"].append(float(out.loss.detach())))
        return model, tokenizer

    monkeypatch.setattr(loop_mod, "load_model", load_and_watch)
    return seen


def test_the_training_step_gives_the_encoder_the_source_and_the_decoder_the_shifted_target(setup, tok, monkeypatch,
                                                                                          tmp_path):
    _, model_path, data = setup
    seen = _record_forwards(monkeypatch)
    train(_recipe(model_path, data, tmp_path / "out", steps=1, accumulation=2), progress=False)

    model, target_tokens = seen["module"], set(_ids(tok, "".join(TARGETS)))
    assert len(seen["encoder"]) == len(seen["decoder"]) == len(seen["model"]) == 2  # the step's two micro-batches
    sources = []
    for encoder, decoder, call in zip(seen["encoder"], seen["decoder"], seen["model"]):
        source_ids, mask, labels = encoder["input_ids"], encoder["attention_mask"], call["labels"]
        assert not set(source_ids.flatten().tolist()) & target_tokens  # no target token reaches the encoder
        assert set(source_ids[mask == 0].tolist()) <= {tok.pad_token_id}
        rows = [tok.decode(row[m.bool()]) for row, m in zip(source_ids, mask)]
        sources += rows

        for source, row in zip(rows, labels):  # labels: the target + eos, then IGNORE_INDEX padding
            n = (row != IGNORE_INDEX).sum()
            assert row[:n].tolist() == _ids(tok, MAPPING[source]) + [tok.eos_token_id]
            assert (row[n:] == IGNORE_INDEX).all()

        # The decoder reads the labels shifted right behind the start token, as transformers' _shift_right
        # builds them, and by hand: the start token, then the labels but the last.
        decoder_ids = decoder["input_ids"]
        assert torch.equal(decoder_ids, model._shift_right(labels))
        assert (decoder_ids[:, 0] == model.config.decoder_start_token_id).all()
        for row, label_row in zip(decoder_ids, labels):
            n = (label_row != IGNORE_INDEX).sum()
            assert row[1:n].tolist() == label_row[:n - 1].tolist()
    assert sorted(sources) == sorted(SOURCES)  # each whole source, once, unpadded where the mask says so

    # The step's loss is the mean over every label of the step (the first included: a decoder-only model's
    # first label is no target, an encoder-decoder's is), from the model's own mean loss of each micro-batch.
    counts = [int((call["labels"] != IGNORE_INDEX).sum()) for call in seen["model"]]
    assert counts[0] != counts[1]  # otherwise a wrong count would weigh the micro-batches alike
    expected = sum(loss * n for loss, n in zip(seen["loss"], counts)) / sum(counts)
    logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_tiny_4bit_t5_learns_a_mapping(setup, tmp_path):
    _, model_path, data = setup
    out = tmp_path / "out"
    result = train(_recipe(model_path, data, out, steps=20, eval_path=data), progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    untrained_loss = metrics[0]["loss"]  # step 1's loss is the untrained model's
    assert untrained_loss > math.log(len(char_tokenizer()))  # a random model: worse than uniform
    assert result.best_eval_loss < untrained_loss / 10
    assert result.exact_match["before"] == 0.0
    assert result.exact_match["after"] >= 4 / 6


def test_source_and_target_are_cut_to_their_own_maximum(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "abcdefgh", "completion": "ABCDEFG"}) + "\n"
                    + json.dumps({"prompt": "a" * 30, "completion": "B" * 7}) + "\n")
    (cut, _), stats = load_examples(str(path), "train", "auto", tok, 5, 4, False, seq2seq=True)
    assert cut.seq2seq and cut.input_ids == _ids(tok, "abcde")
    assert cut.labels == _ids(tok, "ABC") + [tok.eos_token_id]  # room for the eos
    assert stats.truncated == 2

    # A long source leaves the target its whole budget (a decoder-only row would share one limit).
    (_, whole), stats = load_examples(str(path), "train", "auto", tok, 30, 8, False, seq2seq=True)
    assert whole.input_ids == _ids(tok, "a" * 30) and whole.labels == _ids(tok, "B" * 7) + [tok.eos_token_id]
    assert stats.truncated == 0


def test_the_encoder_gets_the_tokenizers_own_special_tokens_kept_when_cut(tmp_path):
    from tokenizers.processors import TemplateProcessing

    t5_like = char_tokenizer()  # T5's tokenizer appends </s> to what it encodes
    t5_like.backend_tokenizer.post_processor = TemplateProcessing(single="$A </s>",
                                                                  special_tokens=[("</s>", t5_like.eos_token_id)])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "abcdef", "completion": "XY"}) + "\n")
    (full,), _ = load_examples(str(path), "train", "auto", t5_like, 16, 8, False, seq2seq=True)
    assert full.input_ids == _ids(t5_like, "abcdef") + [t5_like.eos_token_id]
    (cut,), stats = load_examples(str(path), "train", "auto", t5_like, 4, 8, False, seq2seq=True)
    assert cut.input_ids == _ids(t5_like, "abc") + [t5_like.eos_token_id] and stats.truncated == 1
    assert cut.labels == _ids(t5_like, "XY") + [t5_like.eos_token_id]  # the eos appended once


def test_batches_pad_each_side_as_transformers_seq2seq_collator(tok):
    from transformers import DataCollatorForSeq2Seq

    examples = [Tokenized(_ids(tok, "a long source"), _ids(tok, "X") + [2], seq2seq=True),
                Tokenized(_ids(tok, "short"), _ids(tok, "XYZW") + [2], seq2seq=True)]
    ours = collate(examples, tok.pad_token_id)
    theirs = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    assert ours.keys() == {"input_ids", "attention_mask", "labels"}
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape == (2, 13) and ours["labels"].shape == (2, 5)
    assert examples[0].length == 13 + 2  # both sides count as tokens read


def test_exact_match_compares_the_decoders_generation_only(setup, tok):
    _, model_path, _ = setup
    from nf4tune.layers.lora import lora_layers

    model, _ = nf4tune.load_model(model_path, device="cpu", compute_dtype=torch.float32,
                                  lora=nf4tune.LoraConfig(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():  # seeded random adapters: the random model alone only ever says <pad>
        gen = torch.Generator().manual_seed(0)
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
    prompt = torch.tensor([_ids(tok, "cat")])
    out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert out[0, 0] == model.config.decoder_start_token_id  # generate's output: start token, then the reply
    reply = out[0, 1:].tolist()
    assert set(reply) - {tok.pad_token_id}
    assert generated_tokens(model, out, prompt.shape[1]).tolist() == [reply]

    prompt_ids = prompt[0].tolist()
    assert exact_match_accuracy(model, tok, [(prompt_ids, reply)]) == 1.0
    assert exact_match_accuracy(model, tok, [(prompt_ids, prompt_ids + reply)]) == 0.0  # no prompt echo
    # The trainer's held-out examples give the encoder's source and the labels as the expected reply.
    assert exact_match(model, tok, [Tokenized(prompt_ids, reply, seq2seq=True)]) == 1.0


def test_decoder_only_settings_are_refused_before_the_model_loads(setup, monkeypatch, tmp_path):
    _, model_path, data = setup
    monkeypatch.setattr(loop_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(Nf4tuneError, match="data.packing is for decoder-only models"):
        train(_recipe(model_path, data, tmp_path / "packed", steps=1, packing=True), progress=False)
    with pytest.raises(Nf4tuneError, match="data.train_on_source is for decoder-only models"):
        train(_recipe(model_path, data, tmp_path / "source", steps=1, train_on_source=True), progress=False)
    recipe = _recipe(model_path, data, tmp_path / "bench", steps=1)
    recipe.eval.benchmarks = [{"task": "perplexity", "data": str(data), "column": "prompt"}]
    with pytest.raises(Nf4tuneError, match=r"eval.benchmarks \(multiple choice, perplexity\) score decoder-only"):
        train(recipe, progress=False)


def test_perplexity_refuses_an_encoder_decoder():
    from types import SimpleNamespace

    from nf4tune.evaluate.perplexity import perplexity

    t5 = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=True))
    with pytest.raises(Nf4tuneError, match="perplexity needs a causal"):
        perplexity(t5, char_tokenizer(), "some text", progress=False)


def test_a_row_without_a_source_is_a_bad_row(tmp_path, tok):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "only a target"}) + "\n")
    with pytest.raises(Nf4tuneError, match="row 1 gives the encoder no source text"):
        load_examples(str(path), "train", "auto", tok, 16, 16, False, seq2seq=True)


def test_a_chat_row_trains_on_its_last_assistant_turn(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    (example,), _ = load_examples(str(path), "train", "auto", tok, 64, 16, False, seq2seq=True)
    assert tok.decode(example.input_ids) == tok.apply_chat_template(messages[:3], tokenize=False,
                                                                    add_generation_prompt=True)
    assert example.labels == _ids(tok, "ciao\n") + [tok.eos_token_id]
