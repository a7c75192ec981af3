"""nf4tune models inside transformers' Trainer and TRL, against transformers' loss, PEFT + bitsandbytes."""

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.models import checkpointing

peft = pytest.importorskip("peft", reason="peft is the oracle for these tests")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for these tests")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402

TEXTS = [f"{a} plus {b} is {a + b}." for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", dtype=torch.float32)


def _load(path, **kwargs):
    """The tiny model with fresh adapters drawn from seed 0 (not from whatever the tests before left in the
    global generator: a Trainer seeds only what happens after it is built)."""
    kwargs.setdefault("lora", nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
    kwargs.setdefault("compute_dtype", torch.float32)
    torch.manual_seed(0)
    return nf4tune.load_model(path, device="cpu", progress=False, **kwargs)


def _randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 95, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt without loss
    return ids, mask, labels


@pytest.mark.parametrize("num_items", [None, 57])
def test_training_loss_and_gradients_match_transformers(tiny, num_items):
    model, _ = _load(tiny)
    _randomize_lora(model)
    model.train()
    ids, mask, labels = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(num_items)

    ours = model(**kwargs)
    assert ours.logits is None  # the chunked loss never builds batch x seq x vocab logits
    ours.loss.backward()
    ours_grads = _grads(model)
    model.zero_grad()

    theirs = model(**kwargs, skip_logits=False)  # transformers' own forward and ForCausalLMLoss
    assert theirs.logits.shape == (3, 14, model.config.vocab_size)
    theirs.loss.backward()
    their_grads = _grads(model)

    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert set(ours_grads) == set(their_grads) and len(ours_grads) == 2 * 7 * 2
    for name, g in their_grads.items():
        assert (ours_grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name

    model.eval()  # evaluation keeps the usual logits
    with torch.no_grad():
        out = model(**kwargs)
    assert out.logits is not None and torch.isclose(out.loss, theirs.loss.detach(), rtol=1e-5)


class _LogitRows(TorchDispatchMode):
    """While active (forward and backward), the most rows of any new tensor an op makes whose last
    dimension is the vocabulary: the tokens projected to the vocabulary at once. Views of an op's
    inputs (the head's weight transposed) allocate nothing and are not counted."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.most = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.most = max(self.most, t.numel() // self.vocab)
        return out


def test_training_forward_with_labels_never_makes_the_full_logits(tiny):
    """The memory claim of the labels path, counted instead of timed: with 8-token loss chunks no op
    makes more than 8 tokens' logits (or their gradient), where transformers' loss makes them all."""
    model, _ = _load(tiny)
    model.nf4tune.loss_chunk_tokens = 8
    model.train()
    ids, mask, labels = _batch()
    vocab = model.config.vocab_size
    assert vocab not in (model.config.hidden_size, model.config.intermediate_size, ids.shape[1])  # no other dim matches
    rows = {}
    for skip in (True, False):
        with _LogitRows(vocab) as seen:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=skip)
            out.loss.backward()
        rows[skip] = seen.most
        model.zero_grad()
    assert rows[False] >= ids.numel()  # the counter sees transformers' batch x seq x vocab logits
    assert 0 < rows[True] <= 8  # nf4tune's default path: one chunk of logits at a time


def test_peft_habits_stop_with_one_sentence_or_work(tiny, capsys):
    model, _ = _load(tiny)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(nf4tune.Nf4tuneError, match="already a QLoRA model from nf4tune.load_model"):
        peft.prepare_model_for_kbit_training(model)
    with pytest.raises(nf4tune.Nf4tuneError, match="drop peft.prepare_model_for_kbit_training / get_peft_model"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable  # nothing was frozen

    assert model.get_input_embeddings() is model.model.embed_tokens
    model.print_trainable_parameters()
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert total > 10 * trainable_count
    assert capsys.readouterr().out == (f"trainable params: {trainable_count:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable_count / total:.4f}\n")  # PEFT's line

    # Gradient checkpointing on and off, as a PEFT script toggles it (under either of transformers' names):
    # the same gradients either way.
    _randomize_lora(model)
    model.train()
    ids, mask, labels = _batch()
    for enable, disable, is_on in _script_checkpointing_names():
        grads = {}
        for on in (True, False):
            if on:
                model.enable_input_require_grads()
                _script_calls(model, enable, {"use_reentrant": True})
            else:
                _script_calls(model, disable)
            assert _script_calls(model, is_on) is on
            model.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            grads[on] = _grads(model)
        for name, g in grads[False].items():
            assert g.abs().max() > 0 and torch.allclose(grads[True][name], g, rtol=1e-4, atol=1e-7), (enable, name)


def _script_checkpointing_names():
    """(enable, disable, is-on) as users' scripts name them: the old names on every release (deprecated
    since transformers 5.25, gone in v6), the new ones where the installed transformers has them."""
    names = [("gradient_checkpointing_enable", "gradient_checkpointing_disable", "is_gradient_checkpointing")]
    if checkpointing.renamed():
        names.append(("activation_checkpointing_enable", "activation_checkpointing_disable",
                      "is_activation_checkpointing"))
    return names


def _script_calls(model, name, *args):
    """`model.<name>(*args)` (or the property), as a user's script would; transformers' own deprecation
    warning for the old names is the script's business, not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        attribute = getattr(model, name)
        return attribute(*args) if callable(attribute) else attribute


def _rows(tokenizer, width=24):
    rows = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: width - 1] + [tokenizer.eos_token_id]
        pad = width - len(ids)
        rows.append({"input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                     "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                     "labels": torch.tensor(ids + [-100] * pad)})
    return rows


def _args(out, max_steps, **kwargs):
    kwargs.setdefault("save_steps", 3)
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=2e-2, lr_scheduler_type="constant",
                             logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, optim="adamw_torch", **kwargs)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_trainer_trains_saves_peft_adapters_and_resumes(tiny, tmp_path, caplog):
    model, tokenizer = _load(tiny)
    rows = _rows(tokenizer)
    trainer = Trainer(model=model, args=_args(tmp_path / "run", 6), train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses

    # save_model writes exactly what nf4tune.save_adapter writes, plus the tokenizer.
    trainer.save_model(tmp_path / "final")
    nf4tune.save_adapter(model, tmp_path / "reference")
    for name in ("adapter_config.json",):
        assert json.loads((tmp_path / "final" / name).read_text()) == json.loads((tmp_path / "reference" / name).read_text())
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()

    # It loads into PEFT on transformers + bitsandbytes, and into nf4tune, with the trained model's logits.
    ids = torch.tensor([tokenizer("3 plus 4 is 7.")["input_ids"]])
    trained = _logits(model, ids)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=bnb, dtype=torch.float32, device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "final")
    reloaded, _ = _load(tiny, adapter=tmp_path / "final", lora=None)
    torch.testing.assert_close(_logits(reloaded, ids), trained)
    # bitsandbytes' CPU path rounds differently; the adapter's effect is far larger than that.
    assert (_logits(theirs, ids) - trained).abs().max() <= 0.01 * trained.abs().max()
    with theirs.disable_adapter():
        assert (_logits(theirs, ids) - trained).abs().max() > 0.05 * trained.abs().max()

    # resume_from_checkpoint continues from step 3 to the same adapter as the uninterrupted run.
    fresh, _ = _load(tiny)
    resumed = Trainer(model=fresh, args=_args(tmp_path / "run", 6), train_dataset=rows, processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert "keys" not in caplog.text  # no missing / unexpected keys reported
    torch.testing.assert_close(_losses(resumed), losses, rtol=1e-4, atol=1e-5)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(lora_layers(fresh)[name].lora_A, layer.lora_A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora_layers(fresh)[name].lora_B, layer.lora_B, rtol=1e-4, atol=1e-6)


def test_sft_trainer_trains_and_its_output_loads(tiny, tmp_path, caplog):
    trl = pytest.importorskip("trl", reason="TRL is a dev extra")
    from datasets import Dataset

    model, tokenizer = _load(tiny)
    data = Dataset.from_list([{"prompt": t.split(" is ")[0] + " is", "completion": " " + t.split(" is ")[1]}
                              for t in TEXTS])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=8, per_device_train_batch_size=6,
                         learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to="none", use_cpu=True, seed=0, disable_tqdm=True, optim="adamw_torch",
                         max_length=32, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    trainer.save_model(tmp_path / "sft" / "final")
    ids = torch.tensor([tokenizer("2 plus 5 is 7.")["input_ids"]])
    reloaded, _ = _load(tiny, adapter=tmp_path / "sft" / "final", lora=None)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_dpo_trainer_trains_on_a_tiny_preference_set(tiny, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is a dev extra")
    from datasets import Dataset

    model, tokenizer = _load(tiny)
    reference, _ = _load(tiny, lora=None)  # the frozen base as DPO's reference
    pairs = [{"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a + b + 2}."}
             for a in range(4) for b in range(4)]
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=6, per_device_train_batch_size=8,
                         learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to="none", use_cpu=True, seed=0, disable_tqdm=True, optim="adamw_torch",
                         bf16=False, beta=0.5)
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and abs(losses[0] - 0.6931) < 0.01 and losses[-1] < losses[0] - 0.1, losses
    trainer.save_model(tmp_path / "dpo" / "final")
    ids = torch.tensor([tokenizer("1 plus 2 is 3.")["input_ids"]])
    reloaded, _ = _load(tiny, adapter=tmp_path / "dpo" / "final", lora=None)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_checkpointing_keeps_the_4bit_outputs_for_the_recompute(tiny, monkeypatch):
    """Gradient checkpointing with kept outputs: the same gradients, bit for bit, as plain checkpointing,
    with the recompute's 4-bit matmuls skipped (one dequantization per layer fewer); a budget too small
    for one output recomputes everything."""
    from nf4tune import dispatch
    from nf4tune.layers import kept_outputs

    model, _ = _load(tiny, lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.1), compute_dtype=torch.bfloat16)
    _randomize_lora(model)
    model.train()
    ids, mask, labels = _batch()
    calls = []
    dequantize = dispatch.dequantize_scratch
    monkeypatch.setattr(dispatch, "dequantize_scratch", lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    layers = len(lora_layers(model))
    runs = {}
    for budget in (1.0, 1e-7, 0.0):  # GiB: all kept, none fits, plain checkpointing
        model.nf4tune.kept_outputs_gib = budget
        calls.clear()
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout draws
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        runs[budget] = (loss.detach(), _grads(model), len(calls))
        assert kept_outputs.kept_bytes() == 0  # all handed back
    assert runs[0.0][2] == 3 * layers and runs[1e-7][2] == 3 * layers  # forward, recompute, backward
    assert runs[1.0][2] == 2 * layers  # no recompute of the matmuls
    for budget in (1.0, 1e-7):
        assert torch.equal(runs[budget][0], runs[0.0][0])
        for name, g in runs[0.0][1].items():
            assert g.abs().max() > 0 and torch.equal(runs[budget][1][name], g), name

    # A script's gradient_checkpointing_enable or activation_checkpointing_enable keeps them too.
    model.nf4tune.kept_outputs_gib = 1.0
    for enable, disable, _ in _script_checkpointing_names():
        _script_calls(model, disable)
        _script_calls(model, enable, {"use_reentrant": True})
        calls.clear()
        model.zero_grad()
        torch.manual_seed(0)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert len(calls) == 2 * layers, enable
        for name, g in runs[0.0][1].items():
            assert torch.equal(model.get_parameter(name).grad, g), (enable, name)


@pytest.mark.parametrize("argument", ["gradient_checkpointing", "activation_checkpointing"])
def test_trainers_checkpointing_argument_gives_the_layers_the_kept_outputs_checkpoint(tiny, tmp_path, argument):
    """Trainer turns checkpointing on itself when its arguments say so, under either name: the layers
    then get nf4tune's checkpoint that keeps the 4-bit outputs, not transformers' plain one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from nf4tune.layers.kept_outputs import KeepOutputsCheckpoint

    if argument == "activation_checkpointing" and not checkpointing.renamed():
        pytest.skip("transformers before 5.25 names it gradient_checkpointing only")
    model, tokenizer = _load(tiny, gradient_checkpointing=False)
    assert not checkpointing.is_checkpointing(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name warns on 5.25: the script's business
        args = _args(tmp_path / "run", 1, save_strategy="no", **{argument: True})
    Trainer(model=model, args=args, train_dataset=_rows(tokenizer)[:8], processing_class=tokenizer).train()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and checkpointing.is_checkpointing(model)
    assert all(isinstance(layer._gradient_checkpointing_func, KeepOutputsCheckpoint) for layer in layers)


@pytest.mark.filterwarnings("error:.*checkpointing.*:FutureWarning", "error:.*checkpointing.*:DeprecationWarning")
def test_nf4tunes_training_arguments_name_checkpointing_as_the_installed_transformers_does(tiny, tmp_path):
    """`checkpointing.training_arguments()` turns Trainer's checkpointing on without a deprecation warning."""
    model, tokenizer = _load(tiny, gradient_checkpointing=False)
    args = _args(tmp_path / "run", 1, save_strategy="no", **checkpointing.training_arguments())
    Trainer(model=model, args=args, train_dataset=_rows(tokenizer)[:8], processing_class=tokenizer).train()
    assert checkpointing.is_checkpointing(model)


def test_a_kept_output_changed_in_place_is_recomputed():
    from nf4tune.layers.kept_outputs import KeptOutputs, kept_bytes

    region, first, second = KeptOutputs(2**20), object(), object()
    with region.running(replay=False):
        a, b = torch.ones(4), torch.ones(4)
        region.keep(first, a)
        region.keep(second, b)
    assert kept_bytes() == 32
    b.add_(1)  # e.g. an in-place op after the layer
    with region.running(replay=True):
        assert region.take(first) is not None and region.take(first) is None  # out of order drops the rest
    assert kept_bytes() == 0
    with region.running(replay=False):
        region.keep(first, a)
        region.keep(second, b)
    b.add_(1)
    with region.running(replay=True):
        assert torch.equal(region.take(first), a) and region.take(second) is None
    del region
    assert kept_bytes() == 0


def test_load_best_model_at_end_reloads_the_best_adapter(tiny, tmp_path, caplog):
    """Evaluation and a checkpoint every 2 steps, the best by eval loss reloaded at the end: with
    greater_is_better=True the best is not the last, so the reload is seen in the logits."""
    model, tokenizer = _load(tiny)
    rows = _rows(tokenizer)
    args = _args(tmp_path / "run", 6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8], processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "keys" not in caplog.text and "Could not" not in caplog.text
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best = max(evals, key=evals.get)
    assert sorted(evals) == [2, 4, 6] and best != 6, evals
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best}")

    ids = torch.tensor([tokenizer("3 plus 4 is 7.")["input_ids"]])
    logits = {step: _logits(_load(tiny, adapter=tmp_path / "run" / f"checkpoint-{step}", lora=None)[0], ids)
              for step in (best, 6)}
    assert not torch.allclose(logits[best], logits[6], atol=1e-3)
    torch.testing.assert_close(_logits(model, ids), logits[best])


def test_bf16_autocast_works_on_a_bf16_model_and_is_refused_on_a_float32_one(tiny):
    """TrainingArguments(bf16=True) runs the forward under CPU bf16 autocast."""
    ids, mask, labels = _batch()
    model, _ = _load(tiny)  # float32 compute
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(nf4tune.Nf4tuneError, match="autocast is on"):
        model(input_ids=ids, attention_mask=mask, labels=labels)

    model, _ = _load(tiny, compute_dtype=torch.bfloat16)
    _randomize_lora(model)
    model.train()
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    autocast.backward()
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in _grads(model).values())
    torch.testing.assert_close(autocast, plain, rtol=2e-2, atol=0)
