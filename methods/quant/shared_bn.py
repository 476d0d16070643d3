"""EMQ's batch normalization: affine parameters shared across bit-widths, running statistics adapted per bit-width.

Kim et al., "Efficient Multi-bit Quantization Network Training via Weight Bias Correction and Bit-wise Coreset
Sampling" (NeurIPS 2025, arXiv 2510.20673), Sec. on BN sharing and BN adaptation:

* one BN (gamma, beta and training-time running statistics) serves every bit-width except 1 bit, whose weight
  distribution collapses to two values and gets its own BN (``share_binary=True`` forces 1 bit onto the shared
  BN, the Table 10 ablation); ``mode="separate"`` gives every trained bit-width its own BN (Any-Precision style);
* BN adaptation (:func:`adapt_batchnorm`): per bit-width, reset the running statistics, switch to the cumulative
  average (momentum None), forward training batches in train mode without gradient, and store the resulting
  mean/variance for that bit-width while gamma/beta stay shared. In eval mode a bit-width with adapted statistics
  normalizes with them; this also makes bit-widths that were never trained servable.

``grad="mean"`` divides the shared gamma/beta gradient by the number of bit-widths that train on it. The
algorithm accumulates every bit-width's backward pass into one gradient, so a shared BN receives the *sum* of k
bit-widths' gradients where a per-bit-width BN receives one; under Adam (the optimizer of the recipes EMQ builds
on) that scale cancels, under SGD it is a k-times larger step on the shared affine parameters. ``mean`` keeps that
step equal to a per-bit-width BN's under any optimizer; the forward pass and running statistics are unchanged.

Adapted statistics live in fixed tables indexed by ``bits - 1`` (1..32), so the state dict has the same keys
whichever bit-widths were adapted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from harness.errors import ConfigError
from harness.export import assign_tensors
from methods.quant.modules import BitSwitchable, set_model_bits

FLOAT_BITS = 32
MAX_BITS = 32
SHARED = "shared"
BINARY = "binary"


GRAD_MODES = ("sum", "mean")


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times ``scale`` backward. Not :func:`methods.quant.lsq.scale_gradient`:
    its ``(x - s x).detach() + s x`` can differ from ``x`` in the last bit, and the shared BN's forward must not."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * ctx.scale, None


class SharedBatchNorm2d(BitSwitchable, nn.Module):
    """Batch norm whose affine parameters are shared by groups of bit-widths (see the module docstring)."""

    def __init__(self, num_features: int, bits_set: Iterable[int], mode: str = "shared", share_binary: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, grad: str = "sum") -> None:
        super().__init__()
        if mode not in ("shared", "separate"):
            raise ValueError(f"mode must be shared or separate, got {mode!r}")
        if grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
        self.grad = grad
        self.bits_set = tuple(sorted({int(b) for b in bits_set}))
        self.mode = mode
        self.share_binary = share_binary
        groups = sorted({self._group(b) for b in self.bits_set})
        self.norms = nn.ModuleDict({g: nn.BatchNorm2d(num_features, eps, momentum) for g in groups})
        self.register_buffer("adapted_mean", torch.zeros(MAX_BITS, num_features))
        self.register_buffer("adapted_var", torch.ones(MAX_BITS, num_features))
        self.register_buffer("adapted", torch.zeros(MAX_BITS, dtype=torch.bool))
        self.bits = self.bits_set[-1]
        self.trained_per_group = {g: sum(1 for b in self.bits_set if self._group(b) == g) for g in groups}

    @classmethod
    def from_norm(cls, norm: nn.BatchNorm2d, bits_set: Iterable[int], mode: str = "shared",
                  share_binary: bool = False, grad: str = "sum") -> SharedBatchNorm2d:
        return cls(norm.num_features, bits_set, mode, share_binary, norm.eps, norm.momentum, grad)

    def _group(self, bits: int) -> str:
        if self.mode == "separate":
            return str(bits)
        return BINARY if bits == 1 and not self.share_binary else SHARED

    def serves(self, bits: int) -> bool:
        """Whether a BN exists for ``bits`` (the shared one covers untrained bit-widths above 1)."""
        return 1 <= bits <= MAX_BITS and self._group(bits) in self.norms

    def set_bits(self, bits: int) -> None:
        if not self.serves(int(bits)):
            raise ConfigError(f"this model has no batch norm for {bits} bits (built for bits {self.bits_set}, "
                              f"BN mode {self.mode}{', 1-bit separate' if not self.share_binary else ''})")
        self.bits = int(bits)

    def norm_for(self, bits: int) -> nn.BatchNorm2d:
        return self.norms[self._group(bits)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm_for(self.bits)
        row = self.bits - 1
        if self.training:
            if self.grad == "mean" and torch.is_grad_enabled():
                sharers = self.trained_per_group.get(self._group(self.bits), 1)
                if sharers > 1:
                    # BatchNorm2d's own forward (running statistics, momentum None) with scaled-gradient affines
                    scaled = {name: _ScaleGradient.apply(p, 1.0 / sharers) for name, p in
                              norm.named_parameters()}
                    return functional_call(norm, scaled, (x,))
            return norm(x)
        if not bool(self.adapted[row]):
            return norm(x)
        return F.batch_norm(x, self.adapted_mean[row], self.adapted_var[row], norm.weight, norm.bias, False, 0.0,
                            norm.eps)

    def store_adapted(self, bits: int) -> None:
        """Keep the active BN's running statistics as the adapted statistics of ``bits``."""
        norm = self.norm_for(bits)
        with torch.no_grad():
            self.adapted_mean[bits - 1] = norm.running_mean
            self.adapted_var[bits - 1] = norm.running_var
            self.adapted[bits - 1] = True

    # -- storage: gamma/beta once per group, running mean/var per bit-width ----------------------------------
    def storage_bits(self, bits: int) -> int:
        return 4 * self.norm_for(bits).num_features * FLOAT_BITS

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        bits_set = tuple(bits_set)
        groups = {self._group(b) for b in bits_set}
        return sum(2 * self.norms[g].num_features * FLOAT_BITS for g in groups) + sum(
            2 * self.norm_for(b).num_features * FLOAT_BITS for b in bits_set)

    # -- export (harness.export): the same values, and the adapted tables rebuilt from them ----------------------
    def statistics(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance evaluation at ``bits`` normalizes with (adapted if there are any)."""
        if bool(self.adapted[bits - 1]):
            return self.adapted_mean[bits - 1], self.adapted_var[bits - 1]
        norm = self.norm_for(bits)
        return norm.running_mean, norm.running_var

    def export_tensors(self, bits: int) -> dict[str, torch.Tensor]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, torch.Tensor]:
        bits_set = tuple(bits_set)
        tensors = {}
        for group in sorted({self._group(b) for b in bits_set}):
            tensors[f"norms.{group}.weight"] = self.norms[group].weight
            tensors[f"norms.{group}.bias"] = self.norms[group].bias
        for b in bits_set:
            tensors[f"bits{b}.mean"], tensors[f"bits{b}.var"] = self.statistics(b)
        return tensors

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        self.load_exported_total(tensors, (bits,))

    @torch.no_grad()
    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        # Each bit-width's statistics go to its adapted row: in eval mode that row normalizes exactly as the BN's
        # running statistics would (the same F.batch_norm call).
        tensors = dict(tensors)
        for b in bits_set:
            self.adapted_mean[b - 1] = tensors.pop(f"bits{b}.mean")
            self.adapted_var[b - 1] = tensors.pop(f"bits{b}.var")
            self.adapted[b - 1] = True
        assign_tensors(self, tensors)


def shared_norms(model: nn.Module) -> list[SharedBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, SharedBatchNorm2d)]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, bits: Sequence[int], inputs: Sequence[torch.Tensor]) -> None:
    """BN adaptation: per bit-width, cumulative running statistics over ``inputs`` in train mode, stored per bit.

    No gradient and no weight change; every BN's training-time running statistics and momentum are restored
    afterwards, so the only effect is the per-bit tables. The model is left in its previous mode.
    """
    norms = shared_norms(model)
    if not norms or not inputs:
        return
    saved = {id(bn): (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
             for m in norms for bn in m.norms.values()}
    was_training = model.training
    model.train()
    try:
        for b in bits:
            set_model_bits(model, b)
            for m in norms:
                norm = m.norm_for(b)
                norm.reset_running_stats()
                norm.momentum = None  # cumulative moving average over the adaptation batches
            for x in inputs:
                model(x)
            for m in norms:
                m.store_adapted(b)
    finally:
        for m in norms:
            for bn in m.norms.values():
                mean, var, tracked, momentum = saved[id(bn)]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)
                bn.momentum = momentum
        model.train(was_training)
