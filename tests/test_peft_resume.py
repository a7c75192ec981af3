"""Resume by PEFT habit: `PeftModel.from_pretrained(nf4tune_model, DIR, is_trainable=True)`, against
the trained model, `nf4tune.load_model(base, adapter=DIR)`, PEFT + bitsandbytes and PEFT itself."""

import inspect
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.lora import lora_layers
from nf4tune.models.checkpointing import is_checkpointing

peft = pytest.importorskip("peft", reason="peft is the oracle for these tests")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for these tests")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402

BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)
from test_trainer_compat import _rows  # noqa: E402  (the Trainer tests' batches, shared)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", dtype=torch.float32)


def _load(path, **kwargs):
    """The tiny model in float32, fresh adapters drawn from seed 0."""
    kwargs.setdefault("lora", nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    return nf4tune.load_model(path, device="cpu", progress=False, compute_dtype=torch.float32, **kwargs)[0]


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 95, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _train(model, steps: int) -> list[float]:
    """`steps` steps of a plain loop with a fresh AdamW on the trainable parameters; the losses."""
    ids, mask, labels = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(_batch()[0]).logits


def _trainable(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def _same_files(a, b):
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_from_pretrained_resumes_training_where_the_original_left_off(tiny, tmp_path):
    original = _load(tiny)
    _train(original, 4)
    original.save_pretrained(tmp_path / "checkpoint")
    trained = _logits(original)

    resumed = peft.PeftModel.from_pretrained(_load(tiny), tmp_path / "checkpoint", is_trainable=True)
    assert isinstance(resumed, peft.PeftModel)  # what the script gets is what PEFT returns
    torch.testing.assert_close(_logits(resumed), trained, rtol=0, atol=0)
    torch.testing.assert_close(_logits(_load(tiny, lora=None, adapter=tmp_path / "checkpoint")), trained, rtol=0, atol=0)
    assert _trainable(resumed) == _trainable(original) and len(_trainable(original)) == 2 * 7 * 2
    assert resumed.get_nb_trainable_parameters() == original.get_nb_trainable_parameters()
    assert is_checkpointing(resumed.get_base_model())

    # Both go on alike: the same losses, and save the same adapter.
    assert _train(resumed, 3) == _train(original, 3)
    resumed.save_pretrained(tmp_path / "resumed")
    original.save_pretrained(tmp_path / "continued")
    _same_files(tmp_path / "resumed", tmp_path / "continued")

    with resumed.disable_adapter():  # the base model alone, as PEFT's
        torch.testing.assert_close(_logits(resumed), _logits(_load(tiny, lora=None)))
    assert not torch.allclose(_logits(resumed), _logits(_load(tiny, lora=None)))


def test_is_trainable_false_gives_frozen_adapters_and_a_model_without_lora_works_too(tiny, tmp_path):
    model = _load(tiny)
    _train(model, 2)
    model.save_pretrained(tmp_path / "adapter")
    for fresh in (_load(tiny), _load(tiny, lora=None)):
        frozen = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
        assert not _trainable(frozen) and len(lora_layers(frozen.get_base_model())) == 14
        assert frozen.peft_config["default"].inference_mode
        torch.testing.assert_close(_logits(frozen), _logits(model), rtol=0, atol=0)
    frozen.set_requires_grad("default")  # PEFT's way to make it train after all
    assert _trainable(frozen) == _trainable(model)
    plain = peft.PeftModel.from_pretrained(_load(tiny, lora=None), tmp_path / "adapter", is_trainable=True)
    assert _trainable(plain) == _trainable(model)
    assert is_checkpointing(plain.get_base_model())  # as load_model(base, adapter=DIR) gives it


def test_the_adapters_config_wins_over_the_models_lora(tiny, tmp_path):
    """As PEFT loads an adapter onto a base: its rank, alpha and layers, whatever LoRA the model had."""
    other = _load(tiny, lora=nf4tune.LoraConfig(r=8, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in lora_layers(other).values():
            layer.lora_B.normal_(0, 0.1)
    other.save_pretrained(tmp_path / "r8")

    resumed = peft.PeftModel.from_pretrained(_load(tiny), tmp_path / "r8", is_trainable=True)  # an r=4 all-linear model
    layers = lora_layers(resumed.get_base_model())
    assert sorted(layers) == sorted(lora_layers(other)) and {layer.r for layer in layers.values()} == {8}
    torch.testing.assert_close(_logits(resumed), _logits(other), rtol=0, atol=0)
    resumed.save_pretrained(tmp_path / "again")
    _same_files(tmp_path / "again", tmp_path / "r8")


def test_an_adapter_peft_wrote_loads_as_peft_and_bitsandbytes_load_it(tiny, tmp_path):
    fp = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(fp, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft")

    ours = peft.PeftModel.from_pretrained(_load(tiny), tmp_path / "peft", is_trainable=True)
    bnb = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BNB, dtype=torch.float32, device_map="cpu"),
        tmp_path / "peft")
    assert _trainable(ours) == {n.replace(".default.weight", "") for n in _trainable(theirs)}
    reference = _logits(bnb)
    # bitsandbytes' CPU path rounds differently; the adapter's effect is far larger than that.
    assert (_logits(ours) - reference).abs().max() <= 0.01 * reference.abs().max()
    with bnb.disable_adapter():
        assert (_logits(ours) - _logits(bnb)).abs().max() > 0.05 * reference.abs().max()


def test_adapter_names_are_peft_s_and_one_adapter_is_held(tiny, tmp_path):
    model = _load(tiny)
    _train(model, 2)
    model.save_pretrained(tmp_path / "adapter")
    named = peft.PeftModel.from_pretrained(_load(tiny), tmp_path / "adapter", adapter_name="sql", is_trainable=True)
    assert named.active_adapter == "sql" and list(named.peft_config) == ["sql"]
    torch.testing.assert_close(_logits(named), _logits(model), rtol=0, atol=0)
    named.save_pretrained(tmp_path / "out")

    # PEFT saves an adapter not named "default" in a subfolder of that name: so does nf4tune.
    base = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BNB, dtype=torch.float32, device_map="cpu")
    peft.PeftModel.from_pretrained(base, tmp_path / "adapter", adapter_name="sql").save_pretrained(tmp_path / "peft_out")
    assert (tmp_path / "peft_out" / "sql" / "adapter_model.safetensors").is_file()
    _same_files(tmp_path / "out" / "sql", tmp_path / "adapter")

    with pytest.raises(nf4tune.Nf4tuneError, match="holds one adapter"):
        named.load_adapter(tmp_path / "adapter", adapter_name="chat")
    with pytest.raises(nf4tune.Nf4tuneError, match="holds one adapter"):
        named.set_adapter("chat")
    with pytest.raises(nf4tune.Nf4tuneError, match="nf4tune merge"):
        named.merge_and_unload()


def test_other_peft_habits_still_stop_with_one_sentence(tiny, tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(nf4tune.Nf4tuneError, match="already a QLoRA model.*PeftModel.from_pretrained"):
        peft.get_peft_model(_load(tiny), config)
    plain = _load(tiny, lora=None)
    for habit in (lambda: peft.get_peft_model(plain, config), lambda: peft.prepare_model_for_kbit_training(plain)):
        with pytest.raises(nf4tune.Nf4tuneError, match=r"PEFT cannot wrap.*lora=nf4tune.LoraConfig"):
            habit()
    assert all(not p.requires_grad for p in plain.parameters()) and not lora_layers(plain)  # nothing changed

    model = _load(tiny, lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=False))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": [3]}))
    weights = "adapter_model.safetensors"
    (tmp_path / "tokens" / weights).write_bytes((tmp_path / "adapter" / weights).read_bytes())
    with pytest.raises(nf4tune.Nf4tuneError, match=r"load it with nf4tune.load_model\(base, adapter=DIR\)"):
        peft.PeftModel.from_pretrained(_load(tiny), tmp_path / "tokens")


def _args(out, max_steps):
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=3,
                             gradient_accumulation_steps=2, learning_rate=2e-2, lr_scheduler_type="constant",
                             logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                             optim="adamw_torch")


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_a_trainer_script_that_resumes_by_peft_habit(tiny, tmp_path, caplog):
    """model = load_model(base, lora=...); model = PeftModel.from_pretrained(model, "checkpoint-3", is_trainable=True);
    Trainer(model=model, ...).train(resume_from_checkpoint=...): the uninterrupted run's losses and adapter."""
    model, tokenizer = nf4tune.load_model(tiny, device="cpu", progress=False, compute_dtype=torch.float32,
                                          lora=nf4tune.LoraConfig(r=4, alpha=8, dropout=0.0))
    rows = _rows(tokenizer)
    trainer = Trainer(model=model, args=_args(tmp_path / "run", 6), train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"

    resumed = peft.PeftModel.from_pretrained(_load(tiny), checkpoint, is_trainable=True)
    again = Trainer(model=resumed, args=_args(tmp_path / "run", 6), train_dataset=rows, processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert "keys" not in caplog.text  # no missing / unexpected keys reported
    torch.testing.assert_close(_losses(again), _losses(trainer), rtol=1e-4, atol=1e-5)
    again.save_model(tmp_path / "final")
    trainer.save_model(tmp_path / "reference")
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-4, atol=1e-6)


def test_the_peft_internals_nf4tune_relies_on():
    """PeftModel.from_pretrained on an nf4tune model takes these from PEFT beyond its public API
    (models/peft_resume.py); each assert says what stops working if PEFT changes it."""
    from peft.tuners.tuners_utils import BaseTuner

    inject = inspect.getsource(BaseTuner.inject_adapter)
    assert "model.named_modules()" in inject, \
        "nf4tune answers PEFT where inject_adapter lists the model's modules: without it get_peft_model is not refused"
    assert {"self", "model", "adapter_name"} <= set(inspect.signature(BaseTuner.inject_adapter).parameters), \
        "nf4tune reads the tuner (self) and adapter_name from inject_adapter's frame"
    assert "self._create_and_replace(" in inject and "self._mark_only_adapters_as_trainable(model)" in inject, \
        "nf4tune's tuner claims the targeted layers through these two: without them PEFT wraps (and fails on) Linear4bit"
    builds_tuner = "self.base_model = cls(model, {adapter_name: peft_config}, adapter_name)"
    assert builds_tuner in inspect.getsource(peft.PeftModel.__init__), \
        "nf4tune finds the PeftModel being built as `self` of a caller of inject_adapter: PeftModel.__init__ builds the tuner"
    source = inspect.getsource(peft.PeftModel.from_pretrained)
    parameters = set(inspect.signature(peft.PeftModel.from_pretrained.__func__).parameters)
    assert {"cls", "model", "adapter_name", "is_trainable"} <= parameters, \
        "nf4tune recognises from_pretrained by its frame's name and its cls / model locals"
    assert "model.load_adapter(" in source and "is_trainable=is_trainable" in source, \
        "the adapter's tensors reach nf4tune through PeftModel.load_adapter, which from_pretrained calls after building"
