"""Helpers shared by the DoReFa-based methods (Any-Precision, Dedicated, EMQ) to build through the harness's
quantized topology (:mod:`harness.topology`).

``fp_shortcut`` is the one departure these methods know: downsampling-shortcut 1x1 convolutions keep
full-precision weights (their input, the same activation the block's first convolution reads, stays quantized).
It is Any-Precision's code (a plain ``nn.Conv2d`` reading the quantized activation in ``resnet20q``), off by
default so that every method quantizes the same network; the paper presets turn it on.
"""

from __future__ import annotations

from torch import nn

from harness.topology import Topology, declare_topology

FP_SHORTCUT_REASON = "fp_shortcut: 1x1 shortcut convolutions keep full-precision weights (Any-Precision's code)"


def method_topology(model: nn.Module, model_name: str, *, fp_shortcut: bool) -> Topology:
    """The harness topology of ``model``, with the full-precision shortcut departure if asked for."""
    topology = declare_topology(model, model_name)
    if fp_shortcut:
        topology = topology.depart(FP_SHORTCUT_REASON, roles=("shortcut",), quantize_weight=False)
    return topology
