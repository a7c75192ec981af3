"""Paged AdamW (32- and 8-bit) against torch.optim.AdamW and bitsandbytes' 8-bit state format."""

import copy

import pytest
import torch

from nf4tune.optim import PagedAdamW, PagedAdamW8bit
from nf4tune.quant.blockwise import dequantize_8bit, quantize_8bit
from nf4tune.quant.codes import dynamic_code


def _problem(seed=0):
    # A noisy linear target: the loss can only fall to the noise floor (0.25), not to zero.
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32), torch.nn.Linear(32, 4))
    x = torch.randn(4096, 64)
    y = x @ (torch.randn(64, 4) / 8) + 0.5 * torch.randn(4096, 4)
    return model, x, y


def _train(model, opt, x, y, steps=200, start=0):
    loss = None
    for i in range(start, start + steps):
        loss = torch.nn.functional.mse_loss(model(x[i % 4::4]), y[i % 4::4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def _groups(model, cls, **kw):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}],
               lr=2e-3, betas=(0.9, 0.95), eps=1e-8, **kw)


def test_paged_adamw_matches_torch_adamw_over_200_steps():
    ours_model, x, y = _problem()
    ref_model, _, _ = _problem()
    ours = _train(ours_model, _groups(ours_model, PagedAdamW), x, y)
    ref = _train(ref_model, _groups(ref_model, torch.optim.AdamW), x, y)
    assert ours == pytest.approx(ref, rel=1e-5)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_8bit_final_loss_within_one_percent_and_state_size():
    model8, x, y = _problem()
    model32, _, _ = _problem()
    opt8 = PagedAdamW8bit(model8.parameters(), lr=1e-3)
    loss8 = _train(model8, opt8, x, y)
    loss32 = _train(model32, torch.optim.AdamW(model32.parameters(), lr=1e-3), x, y)
    assert abs(loss8 - loss32) <= 0.01 * loss32, (loss8, loss32)
    first = opt8.state[model8[0].weight]  # 8192 elements: 8-bit states
    assert first["exp_avg_q"].dtype == torch.uint8 and "exp_avg" not in first
    assert "exp_avg" in opt8.state[model8[2].bias]  # 32 elements: kept in 32-bit

    big = torch.nn.Parameter(torch.randn(1024, 1024))
    big.grad = torch.randn_like(big)
    for cls, expected in ((PagedAdamW, 8.0), (PagedAdamW8bit, 2 + 8 / 256)):
        opt = cls([big])
        opt.step()
        assert opt.state_bytes_per_parameter() == pytest.approx(expected)


def test_state_quantization_has_bitsandbytes_format_and_is_at_least_as_accurate():
    bnb_F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle")
    torch.manual_seed(0)
    m = torch.randn(100_000) * 1e-3
    v = (torch.randn(100_000) * 1e-4) ** 2
    for state, signed in ((m, True), (v, False)):
        code = dynamic_code(signed=signed)
        ours_q, ours_absmax = quantize_8bit(state, code, 256, rounding="nearest")
        bnb_q, bnb_state = bnb_F.quantize_blockwise(state, code=bnb_F.create_dynamic_map(signed=signed), blocksize=256)
        assert torch.equal(ours_absmax, bnb_state.absmax)  # same blocks, same scales
        ours = dequantize_8bit(ours_q, ours_absmax, code, 256)
        bnb_state_ours = bnb_F.QuantState(absmax=ours_absmax, code=bnb_state.code, blocksize=256, dtype=torch.float32)
        assert torch.equal(bnb_F.dequantize_blockwise(ours_q, bnb_state_ours), ours)  # bnb reads our codes
        theirs = bnb_F.dequantize_blockwise(bnb_q, bnb_state)
        assert ((ours - state).abs() <= (theirs - state).abs() + 1e-12).all()  # exact nearest code
        assert (ours_q == bnb_q).float().mean() > 0.9


def test_state_dict_round_trip_continues_exactly():
    for cls in (PagedAdamW, PagedAdamW8bit):
        model_a, x, y = _problem()
        opt_a = cls(model_a.parameters(), lr=1e-3)
        _train(model_a, opt_a, x, y, steps=10)
        saved_model = {k: v.clone() for k, v in model_a.state_dict().items()}
        saved_opt = copy.deepcopy(opt_a.state_dict())  # state_dict() shares the live tensors
        _train(model_a, opt_a, x, y, steps=10, start=10)

        model_b, _, _ = _problem()
        model_b.load_state_dict(saved_model)
        opt_b = cls(model_b.parameters(), lr=1e-3)
        opt_b.load_state_dict(saved_opt)
        _train(model_b, opt_b, x, y, steps=10, start=10)
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(a, b), cls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="paging needs CUDA")
def test_cuda_paging_matches_resident_states():
    for cls in (PagedAdamW, PagedAdamW8bit):
        results = []
        for paging in (False, True):
            model, x, y = _problem()
            model, x, y = model.cuda(), x.cuda(), y.cuda()
            opt = cls(model.parameters(), lr=1e-3, paging=paging)
            _train(model, opt, x, y, steps=20)
            states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            assert all(t.is_pinned() for t in states) == paging
            results.append([p.detach().cpu() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results))
