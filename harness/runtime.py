"""How a schedule executes on the hardware: device, data placement, bf16 autocast, channels_last, torch.compile.

None of these change *what* is trained; they change how fast. ``amp="bf16"`` does change the numbers (matmuls
and convolutions run in bfloat16, quantizers then see bfloat16 inputs), so it is part of a run's spec and its
records, and tables never mix it silently with fp32 runs (``check_same_schedule`` compares specs).

The GPU fast path (``data_placement="auto"`` on CUDA): in-memory data sets (digits, Fashion-MNIST, CIFAR, synthetic)
are copied to the GPU once as uint8; each batch is gathered, scaled and augmented there (pad-crop offsets and flips
are drawn on the CPU generator, 3 numbers per sample, so the GPU path sees exactly the CPU path's augmentation);
no DataLoader worker touches a sample. Folder data sets (TinyImageNet, ImageNet) stay on the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from harness.data import DataBundle
from harness.errors import ConfigError

#: Narrowest convolution (output channels) that oneDNN's CPU kernels are trusted with; see ``needs_onednn_off``.
ONEDNN_MIN_CHANNELS = 8


def needs_onednn_off(model: nn.Module, device: torch.device) -> bool:
    """True on the CPU when some convolution has fewer than 8 output channels.

    With torch 2.14.1 on an AMD EPYC host, oneDNN's convolution backward corrupted the heap (abort) or spun forever
    on ResNet-20 at width 0.25 (4-channel convolutions), on digits and on 28x28 inputs alike; the same runs with
    oneDNN off, or at width 0.5, were fine. Turning oneDNN off costs about 3x in CPU step time, so it is done
    only for such narrow networks (tests and smoke runs), for the duration of one cell.
    """
    if device.type != "cpu":
        return False
    return any(channels < ONEDNN_MIN_CHANNELS for channels in _conv_output_channels(model))


def _conv_output_channels(model: nn.Module):
    """Output channels per group of every convolution, grouped ones (MBQuant's branches) included."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            yield module.out_channels // module.groups
        elif hasattr(module, "out_per_branch"):
            yield module.out_per_branch
        else:
            yield from (p.shape[0] for p in module.parameters(recurse=False) if p.ndim == 4)


COMPILE_GRAPH_LIMIT = 64  # graphs per code object: bit-widths x {train, eval} x the phases' modes, with room


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device and memory format; compile in place (state-dict keys stay unchanged)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            # dynamic=False: the shapes are fixed per data set; set_bits changes module attributes, which
            # dynamo guards on, so each bit-width and train/eval mode gets its own graph. Dynamo's limit of 8
            # graphs per code object counts every model that shares a class's forward, so a second cell in one
            # process would silently fall back to eager: start each model with empty caches and room for its
            # graphs.
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_GRAPH_LIMIT)
            model.compile(dynamic=False)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def place_data(data: DataBundle, device: torch.device, placement: str) -> DataBundle:
    """Hold in-memory splits on ``device`` when ``placement`` is "device", or "auto" and the device is a GPU."""
    if placement == "host" or (placement == "auto" and device.type != "cuda"):
        return data
    train, test = data.train.on_device(device), data.test.on_device(device)
    if train is None or test is None:
        if placement == "device":
            raise ConfigError(f"--data-on device: {data.info.name} is read from files and cannot be held on the "
                              f"device; use --data-on host or auto")
        return data
    return replace(data, train=train, test=test)
