"""Cost accounting: wall time per phase synchronized with the device, and analytic storage.

Storage is counted, not measured: each layer that implements ``storage_bits(bits)`` /
``storage_bits_total(bits_set)`` (see :mod:`methods.quant.modules`) reports its own; any other leaf layer
counts its parameters and floating-point buffers at 32 bits (BN running statistics included, integer step
counters excluded). ``python cli.py export`` writes exactly what these rules count (:mod:`harness.export`), so
the storage columns equal the payload of a real artifact.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

FLOAT_BITS = 32
PHASES = ("prepare", "train", "finalize", "eval")


def plain_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a layer without its own storage rule stores, by name: its parameters and its persistent
    floating-point buffers (BN running statistics included, integer step counters excluded), 32 bits each.
    :mod:`harness.export` writes exactly these for such a layer."""
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update((name, b) for name, b in module.named_buffers(recurse=False)
                   if b.is_floating_point() and name not in module._non_persistent_buffers_set)
    return tensors


def _plain_bits(module: nn.Module) -> int:
    return sum(t.numel() * FLOAT_BITS for t in plain_tensors(module).values())


def _walk(module: nn.Module, count) -> int:
    own = count(module)
    if own is not None:
        return own
    return _plain_bits(module) + sum(_walk(child, count) for child in module.children())


def storage_bits_of(model: nn.Module, bits: int) -> int:
    """Bits to store ``model`` for deployment at ``bits``."""
    return _walk(model, lambda m: m.storage_bits(bits) if hasattr(m, "storage_bits") else None)


def storage_bits_total_of(model: nn.Module, bits_set: Iterable[int]) -> int:
    """Bits to store ``model`` so that it serves every bit-width in ``bits_set``."""
    bits_set = tuple(bits_set)
    return _walk(model, lambda m: m.storage_bits_total(bits_set) if hasattr(m, "storage_bits_total") else None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall seconds per phase; each measurement waits for the device before reading the clock."""

    def __init__(self, device: torch.device, seconds: dict[str, float] | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float, seconds or {})
        self._running_since: float | None = None
        self._running_name = ""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase. On CUDA the phase is bracketed by CUDA events on the current stream (after a device
        synchronization, so the events measure the phase's work, not earlier queued kernels)."""
        synchronize(self.device)
        start = time.perf_counter()
        events = None
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        self._running_since, self._running_name = start, name
        try:
            yield
        finally:
            self._running_since = None
            if events is not None:
                events[1].record()
                events[1].synchronize()
                self.seconds[name] += events[0].elapsed_time(events[1]) / 1000.0
            else:
                self.seconds[name] += time.perf_counter() - start

    def snapshot(self) -> dict[str, float]:
        """Seconds per phase, the running phase's elapsed part included (host clock): what a checkpoint taken in
        the middle of a phase must carry so that a resumed run counts that time once."""
        seconds = dict(self.seconds)
        if self._running_since is not None:
            synchronize(self.device)
            seconds[self._running_name] = seconds.get(self._running_name, 0.0) + (
                time.perf_counter() - self._running_since)
        return seconds

    def total_seconds(self) -> float:
        """Seconds of every phase so far, the running one included (host clock for the running part)."""
        running = time.perf_counter() - self._running_since if self._running_since is not None else 0.0
        return sum(self.seconds.values()) + running

    def hours(self, num_devices: int = 1) -> dict[str, float]:
        return {name: self.seconds.get(name, 0.0) * num_devices / 3600.0 for name in PHASES}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
