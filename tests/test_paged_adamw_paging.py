"""Paged AdamW's paging logic (pinned host states, prefetch on a side stream, copies back ordered by
events) run on CPU: the CUDA calls go through `CudaCalls`, which a fake replaces here. The real CUDA
path is `test_optim.py::test_cuda_paging_matches_resident_states` and benchmarks/gpu_report.py."""

import contextlib

import pytest
import torch

from nf4tune.optim import PagedAdamW, PagedAdamW8bit
from nf4tune.optim.paged_adamw import CudaCalls


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        assert event.recorded_on is not None, "waiting on an event never recorded"
        self.log.append(("wait_event", self.name, event.id))


class _Event:
    count = 0

    def __init__(self, log):
        _Event.count += 1
        self.id, self.log, self.recorded_on = _Event.count, log, None

    def record(self, stream):
        self.recorded_on = stream.name
        self.log.append(("record", stream.name, self.id))


class FakeCuda(CudaCalls):
    """CPU parameters count as a GPU's; "pinned" host states are tagged copies; every call is logged."""

    def __init__(self):
        self.log, self.pinned = [], set()
        self.issuing = "main"

    def pages(self, device):
        return True

    def free_bytes(self, device):
        return 0  # always under pressure: "auto" pages

    def pin(self, t):
        t = t.clone()
        self.pinned.add(t.data_ptr())
        return t

    def is_pinned(self, t):
        return t.data_ptr() in self.pinned

    def new_stream(self, device):
        return _Stream("side", self.log)

    def current_stream(self, device):
        return _Stream("main", self.log)

    @contextlib.contextmanager
    def use_stream(self, stream):
        before, self.issuing = self.issuing, stream.name
        self.log.append(("enter", stream.name))
        yield
        self.log.append(("exit", stream.name))
        self.issuing = before

    def new_event(self):
        return _Event(self.log)

    def record_stream(self, t, stream):
        assert not self.is_pinned(t), "record_stream is for the device copies"
        self.log.append(("record_stream", stream.name))


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _steps(model, opt, steps=6):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 96, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("paging", [True, "auto"])
def test_paged_states_give_torch_adamw_and_stay_in_pinned_memory(paging):
    ours, ref = _model(), _model()
    opt = PagedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, paging=paging)
    fake = opt.cuda = FakeCuda()
    _steps(ours, opt)
    _steps(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1))
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert states and all(fake.is_pinned(t) for t in states)  # the host copies are the ones updated
    moments = [opt.state[p]["exp_avg"] for p in ours.parameters()]
    assert all(m.abs().sum() > 0 for m in moments)


def test_the_next_states_are_fetched_on_the_side_stream_while_the_current_one_updates(monkeypatch):
    model = _model()
    opt = PagedAdamW8bit(model.parameters(), lr=1e-2, paging=True)  # 8-bit and (small) 32-bit states mixed
    fake = opt.cuda = FakeCuda()
    order = {p: i for i, p in enumerate(model.parameters())}
    update = PagedAdamW._update

    def logged_update(p, group, state, m, v):
        fake.log.append(("update", fake.issuing, order[p]))
        update(p, group, state, m, v)

    monkeypatch.setattr(PagedAdamW, "_update", staticmethod(logged_update))
    _steps(model, opt, steps=2)
    log = fake.log
    n = len(order)
    assert sum(e[0] == "update" for e in log) == 2 * n and all(e[1] == "main" for e in log if e[0] == "update")
    first_step = log[:next(i for i, e in enumerate(log) if e[0] == "wait_stream" and e[1] == "main") + 1]
    assert first_step[0] == ("wait_stream", "side", "main")  # fetching starts after the gradients are ready
    updates = [i for i, e in enumerate(first_step) if e[0] == "update"]
    # parameter k+1's fetch (an event recorded on the side stream) is issued before parameter k updates
    fetch_ready = [e for e in first_step if e[0] == "record" and e[1] == "side"]
    main_waits = [e for e in first_step if e[0] == "wait_event" and e[1] == "main"]
    assert [e[2] for e in main_waits] == [e[2] for e in fetch_ready]  # main waits for each fetch, in order
    for k in range(n - 1):
        fetch_next = first_step.index(("record", "side", main_waits[k + 1][2]))
        assert fetch_next < updates[k]
    # each parameter's states go back on the side stream after an event recorded behind its update
    done = [e for e in first_step if e[0] == "record" and e[1] == "main"]
    side_waits = [e for e in first_step if e[0] == "wait_event" and e[1] == "side"]
    assert [e[2] for e in side_waits] == [e[2] for e in done] and len(done) == n
    for k in range(n):
        assert updates[k] < first_step.index(("record", "main", done[k][2]))
    assert first_step[-1] == ("wait_stream", "main", "side")  # the step ends once the copies back are issued
    assert sum(e == ("record_stream", "main") for e in first_step) == 2 * n
    assert len(fetch_ready) == n


def test_resident_states_make_no_cuda_calls():
    model = _model()
    opt = PagedAdamW(model.parameters(), lr=1e-2, paging=False)
    fake = opt.cuda = FakeCuda()
    _steps(model, opt, steps=2)
    assert fake.log == [] and not fake.pinned
