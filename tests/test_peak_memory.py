"""Memory figures named for what they measure: peaks, on CPU and CUDA; and `estimate` starting no CUDA
context (issue 17, "Also")."""

import pytest
import torch

from nf4tune.cli.main import main
from nf4tune.train import metrics


def _resident_gib() -> float:
    """The resident set now (what `memory_gib` used to report on CPU)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def test_cpu_figure_is_the_peak_not_the_resident_set_now():
    before = _resident_gib()
    block = torch.ones(96 * 2**20)  # 384 MiB, every page written
    del block  # returned to the system: the resident set falls back
    peak, now = metrics.peak_memory_gib(torch.device("cpu")), _resident_gib()
    assert peak >= before + 0.35
    assert now < peak - 0.3


def test_summary_names_the_cuda_peaks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**30)
    summary = metrics.peak_memory_summary(torch.device("cuda", 0), lambda x: x)
    assert summary["peak_memory_gib"] == 3 and summary["peak_memory_reserved_gib"] == 4
    assert "max_memory_allocated" in summary["peak_memory_measure"]
    cpu = metrics.peak_memory_summary(torch.device("cpu"), lambda x: x)
    assert set(cpu) == {"peak_memory_gib", "peak_memory_measure"} and "ru_maxrss" in cpu["peak_memory_measure"]


@pytest.mark.parametrize("extra", [[], ["--gpus", "2", "--json"]])
def test_estimate_starts_no_cuda_context(monkeypatch, capsys, extra):
    """As on a machine with a GPU: any call that would initialise CUDA fails the test."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("estimate initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    assert main(["estimate", "tiny-random:llama-demo", *extra]) == 0
    assert "total" in capsys.readouterr().out
    assert not torch.cuda.is_initialized()


def test_a_cpu_estimate_counts_no_cuda_context(capsys):
    from nf4tune.plan.estimate import estimate

    gpu, cpu = estimate(_builtin()), estimate(_builtin(), device="cpu")
    assert gpu.overhead > 0 and cpu.overhead == 0
    # the paged optimizer's states count in a CPU run: they are in host memory either way; and a CPU step
    # keeps its attention outputs through the checkpoint (layers.chunked_attention), a GPU step does not
    assert cpu.kept_outputs > gpu.kept_outputs
    assert cpu.total == cpu.total_without_paged_states == pytest.approx(
        gpu.total - gpu.overhead + cpu.kept_outputs - gpu.kept_outputs)
    assert main(["estimate", "tiny-random:llama-demo", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "CUDA context" not in table and "fits on" not in table and "CPU, 1 process(es)" in table
    assert main(["estimate", "tiny-random:llama-demo"]) == 0
    assert "CUDA context" in capsys.readouterr().out


def _builtin() -> str:
    from nf4tune.cli.checks import resolve_builtin

    return resolve_builtin("tiny-random:llama-demo")
