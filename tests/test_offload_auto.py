"""`training.offload_activations: auto`: on CUDA, from a sequence length on, each checkpointed layer's input goes to
host memory; the choice is made in one place (`offload_choice`) and logged. On CPU, with a stand-in for the
device's transfers that records when each happens, the way back overlaps the recompute: the previous layer's input
is on its way while the current layer recomputes."""

import logging

import pytest
import torch

from nf4tune.train import compile as compile_mod
from nf4tune.train import offload
from nf4tune.train.offload import AUTO_MIN_SEQ_LEN, Transfers, offload_choice

pytest.importorskip("test_compiled_train")
from test_compiled_train import LAYERS, STEPS, _run, setup  # noqa: E402,F401  (the compiled-train tests' run)

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_auto_offloads_on_cuda_from_the_threshold_and_says_why():
    assert offload_choice("auto", CUDA, AUTO_MIN_SEQ_LEN, True) == (
        True, f"auto: sequences up to {AUTO_MIN_SEQ_LEN} tokens on cuda, from {AUTO_MIN_SEQ_LEN} on")
    off, why = offload_choice("auto", CUDA, AUTO_MIN_SEQ_LEN - 1, True)
    assert not off and f"under {AUTO_MIN_SEQ_LEN}" in why
    assert offload_choice("auto", CPU, 10 * AUTO_MIN_SEQ_LEN, True)[0] is False
    assert offload_choice("auto", CUDA, 10 * AUTO_MIN_SEQ_LEN, False) == (
        False, "auto: gradient checkpointing is off, so no layer input is kept to offload")
    # an explicit setting wins, either way
    assert offload_choice(True, CPU, 16, True) == (True, "training.offload_activations is true")
    assert offload_choice(False, CUDA, 10 * AUTO_MIN_SEQ_LEN, True) == (False, "training.offload_activations is false")


class _Timeline(Transfers):
    """Host copies by clone; each transfer, and each MLP run (forward or recompute), in one list of events."""

    def __init__(self):
        self.events, self.ids = [], {}

    def _id(self, t):
        return self.ids.setdefault(id(t), len(self.ids))

    def to_host(self, t):
        handle = ["host", t.clone()]
        self.events.append(("send", self._id(handle)))
        return handle

    def prefetch(self, handle):
        self.events.append(("prefetch", self._id(handle)))

    def to_device(self, handle):
        self.events.append(("back", self._id(handle)))
        return handle[1].clone()


def test_auto_on_a_long_enough_run_offloads_and_the_way_back_overlaps_the_recompute(setup, monkeypatch, caplog):  # noqa: F811
    root, model = setup
    host = _Timeline()
    monkeypatch.setattr(offload, "has_own_memory", lambda device: True)  # the CPU stands in for a GPU
    monkeypatch.setattr(offload, "AUTO_MIN_SEQ_LEN", 16)  # the run's rows: up to 24 + 4 + 2 tokens
    monkeypatch.setattr(compile_mod, "transfers_for", lambda device: host)
    original = compile_mod.prepare_layers

    def recording_layers(model, *args):
        offloader = original(model, *args)
        for index, layer in enumerate(compile_mod.decoder_layers(model)):
            layer.mlp.register_forward_pre_hook(lambda m, a, i=index: host.events.append(("mlp", i)))
        return offloader

    monkeypatch.setattr(compile_mod, "prepare_layers", recording_layers)
    with caplog.at_level(logging.INFO, logger="nf4tune"):
        _run(root, model, "auto-offload", compile=False)  # offload_activations left at auto
    assert "activation offload on (auto: sequences up to 30 tokens on cpu, from 16 on)" in caplog.text
    events = host.events
    assert sum(e[0] == "send" for e in events) == sum(e[0] == "back" for e in events) == STEPS * LAYERS
    # per step: forward sends layers 0..L-1; backward brings each back, last first, and starts the previous one's
    # way back before that layer's recompute (its MLP runs again) begins: the copy overlaps the recompute
    step = len(events) // STEPS
    for s in range(STEPS):
        part = events[s * step:(s + 1) * step]
        sends = [i for kind, i in part if kind == "send"]
        backward = part[part.index(("back", sends[-1])):]
        for later, earlier in zip(reversed(sends), list(reversed(sends))[1:]):
            started = backward.index(("prefetch", earlier))
            assert backward.index(("back", later)) < started < backward.index(("back", earlier))
            recomputes = [k for k, e in enumerate(backward) if e[0] == "mlp"]
            # the recompute of `later`'s layer runs after the prefetch of `earlier` started, before `earlier` is back
            assert any(started < k < backward.index(("back", earlier)) for k in recomputes)


def test_auto_stays_off_on_cpu_and_the_setting_is_checked(setup, caplog):  # noqa: F811
    from nf4tune import Nf4tuneError
    from nf4tune.train.config import recipe_from_dict

    root, model = setup
    with caplog.at_level(logging.INFO, logger="nf4tune"):
        _run(root, model, "auto-cpu", compile=False)
    assert "activation offload off (auto: on cpu the host memory is the device's)" in caplog.text
    with pytest.raises(Nf4tuneError, match="training.offload_activations is 'yes'; use one of auto, true, false"):
        recipe_from_dict({"model": {"name_or_path": str(model)}, "data": {"path": "x.jsonl"},
                          "training": {"output_dir": "x", "offload_activations": "yes"}})
    # auto needs no checkpointing; true does
    recipe_from_dict({"model": {"name_or_path": str(model), "gradient_checkpointing": False}, "data": {"path": "x.jsonl"},
                      "training": {"output_dir": "x"}})
