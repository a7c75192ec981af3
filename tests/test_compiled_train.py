"""The compiled training step (`training.compile`), activation offload (`training.offload_activations`)
and the reused dequantize buffer, held to the eager run of `nf4tune train` on a tiny model on CPU.

The compiled runs use the "aot_eager" backend: the same capture of each decoder layer's forward and
backward as Inductor gets (the 4-bit linear + LoRA as a custom op, no graph break, the partitioned
backward), without a minute of C++ code generation; on a GPU only Inductor's code generation differs
(benchmarks/gpu_report.py measures it there)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nf4tune import Nf4tuneError, dispatch
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.train import compile as compile_mod
from nf4tune.train.config import recipe_from_dict
from nf4tune.train.loop import train
from nf4tune.train.offload import Transfers

STEPS, LAYERS = 3, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    model = build_tiny_checkpoint(root / "model", num_hidden_layers=LAYERS)
    rows = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in range(100, 140)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model


def _recipe(root, model, out, **training):
    return recipe_from_dict({
        "model": {"name_or_path": str(model), "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # compiled dropout draws other random numbers than eager
        "data": {"path": str(root / "train.jsonl"), "source_max_len": 24, "target_max_len": 4},
        "training": {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": 4,
                     "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 100, "seed": 5, **training},
    })


def _run(root, model, name, **training):
    out = train(_recipe(root, model, root / name, **training), progress=False).output_dir
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))
    return [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r], adapter


class _FakeHost(Transfers):
    """Copies to "host" and back with clones, counting, as `PinnedHostTransfers` does with streams."""

    def __init__(self):
        self.sent, self.returned, self.prefetched = [], [], 0

    def to_host(self, t):
        self.sent.append(t.shape)
        return ("host", t.clone())

    def prefetch(self, handle):
        self.prefetched += 1

    def to_device(self, handle):
        where, t = handle
        assert where == "host"
        self.returned.append(t)
        return t.clone()


@pytest.fixture
def recorded_weights(monkeypatch):
    """The data pointers of every weight dequantized for training (eager and compiled paths alike)."""
    pointers = []
    scratch = dispatch.dequantize_scratch

    def recording(q, dtype):
        w = scratch(q, dtype)
        pointers.append(w.data_ptr())
        return w

    monkeypatch.setattr(dispatch, "dequantize_scratch", recording)
    return pointers


def _assert_one_buffer(pointers):
    """Every weight of every step after the first lands in one buffer (it grows to the largest weight
    during the first step), where the dequantize kernel can write into a given buffer."""
    assert len(pointers) >= STEPS * LAYERS * 7
    probe = (torch.zeros(64, 1, dtype=torch.uint8), torch.ones(2), 128, 64)
    if dispatch.path("dequantize_4bit", *probe).name in (dispatch.NATIVE, dispatch.TRITON):
        later = pointers[len(pointers) // STEPS:]
        assert len(set(later)) == 1 and len(set(pointers)) <= 3


def test_compiled_offloaded_layers_train_with_the_eager_losses_and_no_graph_break(setup, monkeypatch,
                                                                                  recorded_weights):
    root, model = setup
    eager, eager_adapter = _run(root, model, "eager", compile=False)
    assert len(eager) == STEPS and len({loss for loss, _ in eager}) == STEPS
    _assert_one_buffer(recorded_weights)
    recorded_weights.clear()

    host = _FakeHost()
    monkeypatch.setattr(compile_mod, "transfers_for", lambda device: host)
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_adapter = _run(root, model, "compiled", compile=True, offload_activations=True)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])  # each decoder layer is one graph
    # the layers, alike but for their weights, share their graphs (at most one more for a new sequence length)
    assert 1 <= counters["stats"]["unique_graphs"] < LAYERS
    for (a, ga), (b, gb) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-4) and gb == pytest.approx(ga, rel=1e-3)
    for name, value in eager_adapter.items():
        assert torch.allclose(compiled_adapter[name], value, rtol=1e-3, atol=1e-6), name
    # the compiled layers dequantize inside the custom ops, into the one reused buffer too
    _assert_one_buffer(recorded_weights)
    # each layer's input went to the host and came back, once per micro-batch, the previous one prefetched
    assert len(host.sent) == len(host.returned) == STEPS * LAYERS
    assert host.prefetched == STEPS * (LAYERS - 1)


def test_offloaded_activations_give_the_plain_run_bit_for_bit(setup, monkeypatch):
    root, model = setup
    plain, plain_adapter = _run(root, model, "plain", compile=False)
    host = _FakeHost()
    monkeypatch.setattr(compile_mod, "transfers_for", lambda device: host)
    offloaded, offloaded_adapter = _run(root, model, "offloaded", compile=False, offload_activations=True)
    assert offloaded == plain
    assert all(torch.equal(offloaded_adapter[k], v) for k, v in plain_adapter.items())
    assert len(host.returned) == STEPS * LAYERS and all(s[-1] == 64 for s in host.sent)  # hidden states only


def test_the_switches_are_checked_and_auto_compiles_on_cuda_only(setup):
    root, model = setup
    with pytest.raises(Nf4tuneError, match="training.compile is 'yes'; use one of auto, true, false"):
        _recipe(root, model, root / "x", compile="yes")
    with pytest.raises(Nf4tuneError, match="gradient_checkpointing"):
        recipe_from_dict({"model": {"name_or_path": str(model), "gradient_checkpointing": False},
                          "data": {"path": "x.jsonl"},
                          "training": {"output_dir": "x", "offload_activations": True}})
    assert compile_mod.compile_wanted("auto", torch.device("cuda")) and not compile_mod.compile_wanted(
        "auto", torch.device("cpu"))
    assert compile_mod.compile_wanted(True, torch.device("cpu"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_pinned_host_transfers_round_trip_on_a_side_stream():
    from nf4tune.train.offload import ActivationOffloader, PinnedHostTransfers

    offloader = ActivationOffloader(PinnedHostTransfers(torch.device("cuda")))
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    with offloader.hooks():
        y = (x * 2).sin()  # saves its input, x * 2
    y.sum().backward()
    assert offloader.packed >= 1 and offloader.unpacked == offloader.packed
    assert torch.allclose(x.grad, 2 * torch.cos(x.detach() * 2))


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_inductor_compiled_offloaded_layers_train_with_the_eager_losses(setup):
    root, model = setup
    eager, _ = _run(root, model, "cuda-eager", compile=False)
    torch._dynamo.reset()
    compiled, _ = _run(root, model, "cuda-compiled", compile=True, offload_activations=True)
    for (a, ga), (b, gb) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-3) and gb == pytest.approx(ga, rel=1e-2)
