"""The full-precision reference row of every comparison (``--reference fp``, the default).

The plain network of :func:`harness.models.create_model` (the comparison's ``model`` and ``width``), trained with
cross-entropy by the shared loop :func:`harness.train.run_cell` under the comparison's schedule, seeds and
budget, so it sees exactly the batches the methods see under each seed. It trains and is evaluated at 32 bits
only (``fixed_bits``: the harness runs its cell with bits = eval bits = (32,), whatever the comparison's bits), so
its record has ``method == "fp"`` and ``results`` keyed ``"32"`` alone; every sample-pass counts at 32 bits; its
storage is the 32-bit network's (parameters and floating-point buffers, BN running statistics included, at 32
bits: :func:`harness.cost.storage_bits_of` of the plain model).

The method has no options, so ``fp`` is the only spec that names it and one cell per seed serves the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from harness.config import REFERENCE_METHOD
from harness.cost import FLOAT_BITS
from harness.errors import ConfigError
from harness.method import Batch, Method, RunContext
from harness.method_config import MethodConfig
from harness.models import create_model
from harness.registry import register_method


@dataclass(frozen=True)
class FullPrecisionConfig(MethodConfig):
    """No options: the reference is the same network and loss in every comparison."""


@register_method(REFERENCE_METHOD)
class FullPrecision(Method):
    """The full-precision (32-bit) network of the same model and schedule: the reference row of every table."""

    Config = FullPrecisionConfig
    #: the bit-widths this method trains and is evaluated at, whatever the comparison's bits (see harness.train)
    fixed_bits: ClassVar[tuple[int, ...]] = (FLOAT_BITS,)

    def build(self, model_name: str, num_classes: int, bits: tuple[int, ...], data_info: Any,
              width: float) -> nn.Module:
        return create_model(model_name, num_classes=num_classes, in_chans=data_info.in_chans, mean=data_info.mean,
                            std=data_info.std, width=width, image_size=data_info.image_size)

    def train_step(self, model: nn.Module, batch: Batch, ctx: RunContext) -> dict[str, float]:
        loss = F.cross_entropy(model(batch.x), batch.y)
        loss.backward()
        ctx.count_passes(FLOAT_BITS, len(batch.y))
        return {"loss": loss.item()}

    def set_bits(self, model: nn.Module, bits: int) -> None:
        if bits != FLOAT_BITS:
            raise ConfigError(f"the full-precision reference serves {FLOAT_BITS} bits only, not {bits}")
