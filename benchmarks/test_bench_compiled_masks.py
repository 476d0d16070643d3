"""A compiled DoReFa-quantized ResNet stage with the straight-through mask as the opaque operator of
methods/quant/backward_ops.py against the same stage with the plain ``hardtanh_backward``, for which the partitioner
saves bool masks (the ReLUs' and the clamps'), slow to write on CPU under inductor.

The first stage of the benchmark's ResNet-20 (stem, three basic blocks, 16 channels at 32x32, batch 128), forward
and backward, compiled with ``torch.compile``. The timed call is the opaque operator's; ``extra_info`` holds
``plain_over_opaque``: the median over rounds of the plain stage's time over the opaque one's timed right before
it (alternating, so a machine's speed drift cancels). The plain form saves five bool tensors here, the opaque one
only the mask of the ReLU before pooling, which full precision saves too; that the opaque form keeps the
quantizer's masks out of the saved tensors is a test (``tests/methods/quant/test_backward_ops.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_bench_train_step import alternating_medians
from torch import nn

from methods.quant.dorefa import _ClampQuantize

ROUNDS = 9
LEVELS = 3  # 2 bits


class _PlainClampQuantize(_ClampQuantize):
    """:class:`~methods.quant.dorefa._ClampQuantize` with ``hardtanh_backward`` called directly (the form before
    the opaque operator)."""

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad_output, x, 0.0, 1.0), None


class _Stage(nn.Module):
    """A ResNet-20 first stage as the DoReFa networks build it: stem convolution-BN-ReLU, then three basic blocks
    whose convolutions read quantized activations, then global pooling."""

    def __init__(self, quantize: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.quantize = quantize
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(6))
        self.norms = nn.ModuleList(nn.BatchNorm2d(16) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in range(3):
            first, second = 2 * block, 2 * block + 1
            out = F.relu(self.norms[first](self.convs[first](self.quantize.apply(x, LEVELS))))
            out = self.norms[second](self.convs[second](self.quantize.apply(out, LEVELS)))
            x = F.relu(out + x)
        return x.mean(dim=(2, 3))


def test_compiled_stage_with_opaque_and_plain_mask(benchmark):
    torch.manual_seed(0)
    x = torch.rand(128, 3, 32, 32)
    torch._dynamo.reset()
    layers = {}
    for name, quantize in (("opaque", _ClampQuantize), ("plain", _PlainClampQuantize)):
        torch.manual_seed(0)
        layers[name] = torch.compile(_Stage(quantize))

    def step(name: str) -> None:
        layer = layers[name]
        layer.zero_grad()
        layer(x).sum().backward()

    for name in layers:  # compile, then warm up
        step(name)
        step(name)
    ratio, _, _ = alternating_medians(lambda: step("opaque"), lambda: step("plain"), ROUNDS)
    benchmark(step, "opaque")
    benchmark.extra_info["plain_over_opaque"] = round(ratio, 3)
