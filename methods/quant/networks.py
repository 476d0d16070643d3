"""Turn a full-precision model from :mod:`harness.models` into a quantized one by swapping layers by role.

Convention shared by the methods here (Any-Precision, AdaBits, Dedicated): the input normalization, the stem
convolution and the classifier stay full precision; every other convolution, batch norm and ReLU is replaced
by the method's factories. ``fp_shortcut`` keeps downsampling-shortcut convolutions full precision and their BN
a plain BN shared by all bit-widths (a quirk of the Any-Precision code, kept as its default for fidelity).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from harness.models import role_of
from methods.quant.modules import swap_modules

ALWAYS_FULL_PRECISION = ("input", "stem", "head")


def quantize_network(
    model: nn.Module,
    *,
    conv: Callable[[nn.Conv2d], nn.Module],
    norm: Callable[[nn.BatchNorm2d], nn.Module],
    act: Callable[[nn.Module], nn.Module],
    fp_shortcut: bool = False,
) -> nn.Module:
    """Swap layers of ``model`` in place and return it."""
    kept_roles = ALWAYS_FULL_PRECISION + (("shortcut", "shortcut_norm") if fp_shortcut else ())

    def swap(module: nn.Module) -> nn.Module | None:
        if role_of(module) in kept_roles:
            return module
        if isinstance(module, nn.Conv2d):
            return conv(module)
        if isinstance(module, nn.BatchNorm2d):
            return norm(module)
        if isinstance(module, nn.ReLU):
            return act(module)
        return None

    return swap_modules(model, swap)
