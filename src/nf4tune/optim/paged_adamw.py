"""Paged AdamW, with 32-bit or 8-bit states.

AdamW (decoupled weight decay, bias correction) whose states can live in pinned host memory and be
brought to the GPU parameter by parameter on a side stream, the next parameter's states copied in
while the current one is updated, so the GPU holds about two parameters' states at a time. This is
QLoRA's paged optimizer done with ordinary allocations and explicit copies instead of CUDA managed
memory, whose oversubscription can hang a GPU. On CPU paging does nothing and the math is the same.

The 8-bit variant stores each state blockwise (256 values per float32 absmax) with the dynamic code,
signed for the first moment and unsigned for the second, like bitsandbytes' 8-bit blockwise Adam;
tensors under 4096 elements keep 32-bit states.
"""

from __future__ import annotations

import math

import torch

from ..quant.blockwise import dequantize_8bit, quantize_8bit
from ..quant.codes import dynamic_code, on_device

STATE_BLOCKSIZE = 256
MIN_8BIT_NUMEL = 4096


class CudaCalls:
    """Every CUDA call paging makes, in one place, so the tests run the paging logic on CPU with a
    fake (streams, events and pinned memory that record what was asked of them)."""

    def pages(self, device: torch.device) -> bool:
        """Whether states of parameters on `device` can be paged (a GPU's, to host memory)."""
        return device.type == "cuda"

    def free_bytes(self, device: torch.device) -> int:
        return torch.cuda.mem_get_info(device)[0]

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.is_pinned()

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use_stream(self, stream):
        """A context in which work is issued on `stream`."""
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def record_stream(self, t: torch.Tensor, stream) -> None:
        """The allocator keeps t's memory until the work issued on `stream` so far has run."""
        t.record_stream(stream)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with 32-bit states that may be paged to host memory.

    Args:
        params, lr, betas, eps, weight_decay: as `torch.optim.AdamW` (weight_decay default 0.01).
        paging: "auto" (on CUDA, keep states on the GPU while free memory allows, else page them),
            True (always page on CUDA), False (never). Ignored on CPU.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, paging: bool | str = "auto"):
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.paging = paging
        self.cuda = CudaCalls()  # the tests put a fake here
        self._stream = None

    # --- where states live -------------------------------------------------------------------

    def _page(self, p: torch.Tensor, nbytes: int) -> bool:
        """Whether this parameter's states go to pinned host memory."""
        if self.paging is False or not self.cuda.pages(p.device):
            return False
        if self.paging is True:
            return True
        free = self.cuda.free_bytes(p.device)
        return free < nbytes + (1 << 30)  # keep a GiB of headroom for activations

    def _new_state(self, p: torch.Tensor) -> dict:
        state = {"step": 0}
        if hasattr(p, "device_mesh"):  # an FSDP shard (DTensor): states sharded alike, where it lives
            return {**state, "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        paged = self._page(p, 2 * p.numel() * 4)
        device = "cpu" if paged else p.device
        for name in ("exp_avg", "exp_avg_sq"):
            t = torch.zeros(p.shape, dtype=torch.float32, device=device)
            state[name] = self.cuda.pin(t) if paged else t
        return state

    def _load(self, p: torch.Tensor, state: dict, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 moments of `p` on its device (copies when paged: the update must not write the host states)."""
        return (state["exp_avg"].to(p.device, non_blocking=non_blocking, copy=non_blocking),
                state["exp_avg_sq"].to(p.device, non_blocking=non_blocking, copy=non_blocking))

    def _store(self, p: torch.Tensor, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
            if state[name] is not value:
                state[name].copy_(value, non_blocking=True)

    def state_bytes(self) -> int:
        """Bytes the optimizer states take, wherever they live."""
        return sum(t.nbytes for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor))

    def state_bytes_per_parameter(self) -> float:
        """State bytes per trainable parameter: 8 for 32-bit AdamW, about 2.03 for 8-bit."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"] if p in self.state)
        return self.state_bytes() / max(1, n)

    # --- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in work:
            if p.grad.is_sparse:
                raise RuntimeError("PagedAdamW does not support sparse gradients")
            if not self.state[p]:
                self.state[p] = self._new_state(p)
        paged = [p for p, _ in work if self._is_paged(self.state[p])]
        if paged:
            self._step_paged(work)
        else:
            for p, group in work:
                m, v = self._load(p, self.state[p])
                self._update(p, group, self.state[p], m, v)
                self._store(p, self.state[p], m, v)
        return loss

    def _is_paged(self, state: dict) -> bool:
        return any(isinstance(t, torch.Tensor) and self.cuda.is_pinned(t) for t in state.values())

    def _step_paged(self, work) -> None:
        """Copy the next parameter's states in on a side stream while the current one updates, and
        its results back out on the same stream once the update has been issued."""
        cuda, device = self.cuda, work[0][0].device
        if self._stream is None:
            self._stream = cuda.new_stream(device)
        side, main = self._stream, cuda.current_stream(device)

        def fetch(p):
            with cuda.use_stream(side):
                tensors = self._load(p, self.state[p], non_blocking=True)
                ready = cuda.new_event()
                ready.record(side)
            return tensors, ready

        side.wait_stream(main)  # gradients are ready
        upcoming = fetch(work[0][0])
        for i, (p, group) in enumerate(work):
            (m, v), ready = upcoming
            main.wait_event(ready)
            for t in (m, v):
                cuda.record_stream(t, main)
            if i + 1 < len(work):
                upcoming = fetch(work[i + 1][0])
            self._update(p, group, self.state[p], m, v)
            done = cuda.new_event()
            done.record(main)
            with cuda.use_stream(side):
                side.wait_event(done)
                self._store(p, self.state[p], m, v)
                for t in (m, v):
                    cuda.record_stream(t, side)
        main.wait_stream(side)

    @staticmethod
    def _update(p: torch.Tensor, group: dict, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state["step"] += 1
        t = state["step"]
        grad = p.grad.float()
        p.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        if p.dtype == torch.float32:
            p.addcdiv_(m, denom, value=-step_size)
        else:
            p.copy_(p.float().addcdiv_(m, denom, value=-step_size))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch puts loaded states on the parameters' device; put paged ones back in host memory.
        for p, state in self.state.items():
            if state and self._page(p, self._state_nbytes(state)):
                for name, t in state.items():
                    if isinstance(t, torch.Tensor):
                        state[name] = self.cuda.pin(t.cpu())

    @staticmethod
    def _state_nbytes(state: dict) -> int:
        return sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor))


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with states quantized blockwise to 8 bits (about 2.03 bytes per parameter)."""

    def _new_state(self, p: torch.Tensor) -> dict:
        if p.numel() < MIN_8BIT_NUMEL:
            return super()._new_state(p)
        blocks = -(-p.numel() // STATE_BLOCKSIZE)
        paged = self._page(p, 2 * (p.numel() + 4 * blocks))
        device = "cpu" if paged else p.device
        state = {"step": 0}
        for name in ("exp_avg", "exp_avg_sq"):
            q = torch.zeros(p.shape, dtype=torch.uint8, device=device)
            # Zero moments: code of 0 with absmax 0 decodes to 0 whatever the code.
            a = torch.zeros(blocks, dtype=torch.float32, device=device)
            state[f"{name}_q"], state[f"{name}_absmax"] = (self.cuda.pin(q), self.cuda.pin(a)) if paged else (q, a)
        return state

    def _load(self, p, state, non_blocking=False):
        if "exp_avg" in state:
            return super()._load(p, state, non_blocking)
        out = []
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            q = state[f"{name}_q"].to(p.device, non_blocking=non_blocking)
            a = state[f"{name}_absmax"].to(p.device, non_blocking=non_blocking)
            out.append(dequantize_8bit(q, a, on_device(p.device, dynamic_code, signed), STATE_BLOCKSIZE))
        return out[0], out[1]

    def _store(self, p, state, m, v):
        if "exp_avg" in state:
            return super()._store(p, state, m, v)
        for name, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            q, a = quantize_8bit(value, on_device(value.device, dynamic_code, signed), STATE_BLOCKSIZE, rounding="nearest")
            state[f"{name}_q"].copy_(q, non_blocking=True)
            state[f"{name}_absmax"].copy_(a, non_blocking=True)
