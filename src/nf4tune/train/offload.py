"""`training.offload_activations`: the one tensor a checkpointed decoder layer keeps for backward (its
input hidden states) moved to pinned host memory while the rest of the forward and the later layers'
backward run, and brought back just before the layer is recomputed (as Unsloth does for long sequences).

How: non-reentrant `torch.utils.checkpoint` saves a layer's inputs as saved tensors before it installs
its own hooks for the layer's inner ops, so `saved_tensors_hooks` entered around the checkpoint call
see exactly those inputs and nothing inside the layer.

Where the bytes go is one seam, `Transfers`: `PinnedHostTransfers` on CUDA copies on a side stream
(the forward does not wait for it) and, when a layer's input is unpacked in backward, starts bringing
the previous layer's input back on that stream, so the copy overlaps the layer's recomputation;
`KeepInPlace` on CPU, where host memory is the device's, keeps the tensor as it is.

Whether to offload is decided in one place, `offload_choice`: `training.offload_activations: auto` (the
default) offloads on CUDA once the run's longest sequence reaches `AUTO_MIN_SEQ_LEN` tokens, where the
checkpointed inputs (layers x hidden x tokens) are worth the transfers; the training loop logs the choice
and why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


class Transfers:
    """Moves a saved tensor off the device (`to_host`, returning a handle) and back (`to_device`);
    `prefetch(handle)` may start the way back early. The tests substitute their own."""

    def to_host(self, t: torch.Tensor):
        raise NotImplementedError

    def prefetch(self, handle) -> None:
        """Start bringing `handle` back (optional)."""

    def to_device(self, handle) -> torch.Tensor:
        raise NotImplementedError


class KeepInPlace(Transfers):
    """CPU: the device memory is host memory already; the saved tensor stays as it is."""

    def to_host(self, t: torch.Tensor):
        return t

    def to_device(self, handle) -> torch.Tensor:
        return handle


@dataclass
class _Offloaded:
    host: torch.Tensor
    copied: object  # a torch.cuda.Event: the device-to-host copy has run
    device: torch.device
    back: torch.Tensor | None = None  # the device copy, once a prefetch started it
    arrived: object = None  # its torch.cuda.Event


class PinnedHostTransfers(Transfers):
    """CUDA: pinned host copies made and brought back on a side stream, ordered by events."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def to_host(self, t: torch.Tensor) -> _Offloaded:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written before it is read
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        t.record_stream(self.stream)  # the allocator keeps t's memory until the copy has read it
        return _Offloaded(host, copied, t.device)

    def prefetch(self, handle: _Offloaded) -> None:
        if handle.back is not None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(handle.copied)
            handle.back = handle.host.to(handle.device, non_blocking=True)
            handle.arrived = torch.cuda.Event()
            handle.arrived.record(self.stream)

    def to_device(self, handle: _Offloaded) -> torch.Tensor:
        self.prefetch(handle)
        current = torch.cuda.current_stream(handle.device)
        current.wait_event(handle.arrived)
        handle.back.record_stream(current)  # made on the side stream, used on this one
        return handle.back


# From this many tokens per sequence, `auto` offloads: a 7B model's checkpointed inputs are then 2 GiB
# (32 layers x 4096 x 2 bytes x 8192), and each layer's copy (64 MiB) hides behind its recompute.
AUTO_MIN_SEQ_LEN = 8192


def has_own_memory(device: torch.device) -> bool:
    """Whether `device` has memory of its own to spare by moving tensors to the host (CUDA; not the CPU)."""
    return device.type == "cuda"


def offload_choice(setting, device: torch.device, seq_len: int, checkpointing: bool) -> tuple[bool, str]:
    """Whether `training.offload_activations` = `setting` (auto, true or false) offloads for a run on `device`
    whose sequences are at most `seq_len` tokens, and why, in a few words for the log."""
    if setting != "auto":
        return bool(setting), "training.offload_activations is " + str(bool(setting)).lower()
    if not checkpointing:
        return False, "auto: gradient checkpointing is off, so no layer input is kept to offload"
    if not has_own_memory(device):
        return False, f"auto: on {device.type} the host memory is the device's"
    if seq_len < AUTO_MIN_SEQ_LEN:
        return False, f"auto: sequences of at most {seq_len} tokens, under {AUTO_MIN_SEQ_LEN}"
    return True, f"auto: sequences up to {seq_len} tokens on {device.type}, from {AUTO_MIN_SEQ_LEN} on"


def transfers_for(device: torch.device) -> Transfers:
    """The transfers that suit `device`."""
    return PinnedHostTransfers(device) if device.type == "cuda" else KeepInPlace()


@dataclass
class _Packed:
    handle: object
    previous: "_Packed | None" = None  # the input saved before this one: needed next in backward
    unpacked: bool = False


@dataclass
class ActivationOffloader:
    """Saved-tensor hooks for the decoder layers' checkpointed inputs; `hooks()` is entered around
    each layer's checkpoint call. `packed` / `unpacked` count tensors moved (for tests and reports)."""

    transfers: Transfers
    packed: int = 0
    unpacked: int = 0
    _last: _Packed | None = field(default=None, repr=False)

    def _pack(self, t: torch.Tensor):
        if t.numel() == 0:  # checkpoint's empty placeholder: nothing to move
            return t
        self.packed += 1
        entry = _Packed(self.transfers.to_host(t.detach()), self._last)
        self._last = entry
        return entry

    def _unpack(self, entry):
        if not isinstance(entry, _Packed):
            return entry
        self.unpacked += 1
        t = self.transfers.to_device(entry.handle)
        entry.unpacked, entry.handle = True, None
        previous, entry.previous = entry.previous, None  # backward runs layers in reverse: that one is next
        if previous is not None and not previous.unpacked:
            self.transfers.prefetch(previous.handle)
        if self._last is entry:
            self._last = None
        return t

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
