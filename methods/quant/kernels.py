"""Compiled elementwise kernels for the quantizers with the longest elementwise chains: one pass over memory where
eager PyTorch makes one per operation.

PACT (AdaBits' activations) makes five passes over an activation forward (clip, scale, round, unscale, rescale)
and about ten backward (two masks, the recomputed scaling, rounding error, the clip mask, the product with the
upstream gradient), each with a full-size output; MBQuant's bounded quantizer makes five forward and three
backward. These kernels are the same formulas written for ``torch.compile`` (inductor: one C++/OpenMP loop on the
CPU), with the same float operations in the same order on the same values, so their results have the same bits as
the eager formulas'; reductions (a bound's or a clipping level's gradient) stay eager, over the same elementwise
products in the same memory order. Clamps are written as ``torch.where`` selections, which pass a ``-0.0`` and a
NaN through as the eager clamp does (inductor's ``maximum`` turns ``-0.0`` into ``0.0``); the tests compare bit
patterns (``tests/methods/quant/test_kernels.py``). Inductor compiles with ``-ffp-contract=off`` and without
reciprocal or reassociating math, which is what keeps a product and a division each one IEEE operation.

A kernel runs (:func:`fusable`) on float32 CPU tensors of at least its ``min_elements`` (below that, the compiled
call's fixed cost exceeds the passes it saves), contiguous or channels_last, outside ``torch.compile`` (a compiled
network fuses the formula itself). Not on CUDA: inductor's Triton code for a float division is not the IEEE
division of the eager kernel, so the bits are not guaranteed there. DoReFa's activation quantizer has no compiled
kernel: a compiled forward in an autograd function (a Python backward) was no faster than its eager form (fwd + bwd
of a 128 x 16 x 16 x 16 activation: 691 us eager, 767 us compiled); it has a native C++ operator instead
(:mod:`methods.quant.native`).

PACT and the bounded quantizer try the native C++ loops of :mod:`methods.quant.native` first (no compiled call's
fixed cost, so they pay at every size); these kernels serve where the native loops are unavailable or switched off.

The first call of a kernel compiles it (seconds, once per process; inductor caches the C++ on disk). If compiling
or running a kernel fails (no C++ compiler, for one), one warning is given and the eager formulas, which compute
the same values, serve for the rest of the process. ``MBQ_FUSED_KERNELS=0`` in the environment, or
:func:`fused_kernels`, switches the kernels off; the switch is process-wide, not per thread (training runs its
steps on one thread).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from methods.quant import native

ENVIRONMENT_SWITCH = "MBQ_FUSED_KERNELS"
#: the smallest activations the kernels run on, from whole training steps (ResNet-20, batch 128, bits 2,4,8, 2 Xeon
#: cores, kernels on against off in alternating processes): at 32x32 inputs (activations of 0.5M to 2M elements)
#: an AdaBits step went from 1.61-1.65 to 1.31-1.32 full-precision steps per bit-width and an MBQuant step from
#: 2,619-2,713 to 2,343-2,452 ms; at 8x8 inputs (32K to 131K elements) the kernels made neither faster (MBQuant's
#: step 3.5-3.6 against 3.8-4.0: its broadcast bounds make the compiled loop index per element), so they stop there
PACT_MIN_ELEMENTS = 1 << 19
BOUNDED_MIN_ELEMENTS = 1 << 20
#: the smallest tensors the bounded quantizer's native loops take: below it (MBQuant's weights, a few thousand to 147K
#: elements) the call's checks cost more than the passes saved; an MBQuant 8x8 step (activations from 131K
#: elements) took 0.96-0.98 of its time without the loops when they took every tensor, 1.01-1.02 from this size on
#: (alternating pairs on 2 Xeon cores). PACT's loops take every size.
NATIVE_BOUNDED_MIN_ELEMENTS = 1 << 17


class _Settings:
    enabled: bool = os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"
    min_elements: int | None = None  # overrides every kernel's own (tests)
    failure: str | None = None  # why the kernels stopped, after a failure


@contextlib.contextmanager
def fused_kernels(enabled: bool = True, min_elements: int | None = None) -> Iterator[None]:
    """Switch the kernels on or off inside the block (``min_elements``: the size from which every kernel runs, in
    place of its own)."""
    previous = _Settings.enabled, _Settings.min_elements
    _Settings.enabled = enabled
    _Settings.min_elements = min_elements if min_elements is not None else previous[1]
    try:
        yield
    finally:
        _Settings.enabled, _Settings.min_elements = previous


class CompiledKernel:
    """``formula`` compiled on first use, used from ``min_elements`` elements on.

    ``dynamic=True`` compiles a variant per rank, memory format, pattern of size-1 dimensions and of equal sizes
    (dynamo's duck sizing), inference mode and ``requires_grad`` (the callers pass detached tensors), not one per
    size; each call may add up to :attr:`variant_limit` variants of this formula (dynamo's default of 8 was reached
    by a test running every method's layers through the kernels). Calling it returns the formula's result, or None
    (the caller's eager formula then runs): for that call past the variant limit; for the rest of the process for
    this kernel after an error in tracing or running it (one warning); for every kernel after a failure to
    compile at all (no C++ compiler: one warning)."""

    variant_limit = 64

    def __init__(self, formula: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], min_elements: int,
                 native: str | None = None, native_min_elements: int = 0) -> None:
        self.formula = formula
        self.min_elements = min_elements
        #: the ``mbqbench_native`` operator (:mod:`methods.quant.native`) with the formula's arguments and results,
        #: which :meth:`run_like` tries first, from ``native_min_elements`` elements
        self.native = native
        self.native_min_elements = native_min_elements
        self.failure: str | None = None
        self._compiled: Callable | None = None

    def __call__(self, *args):
        if _Settings.failure is not None or self.failure is not None:
            return None
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.formula, dynamic=True, fullgraph=True)
            with torch._dynamo.config.patch(recompile_limit=self.variant_limit):
                return self._compiled(*args)
        except Exception as error:  # noqa: BLE001 (whatever failed, the eager formula computes the same)
            from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit  # loaded by now

            if isinstance(error, FailOnRecompileLimitHit):
                return None
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
            if isinstance(error, (BackendCompilerFailed, ImportError, OSError)):
                _Settings.failure = reason
                scope = "compiled quantizer kernels are off for this process"
            else:
                self.failure = reason
                scope = f"the compiled kernel {self.formula.__name__} is off for this process"
            warnings.warn(f"{scope} ({reason}); the eager formulas give the same values, more slowly",
                          RuntimeWarning, stacklevel=2)
            return None


    def run_like(self, x: torch.Tensor, *args):
        """The native loop, else the compiled kernel, on ``(x, *args)`` where its result has the eager formula's
        bits and layout, else None (the caller's eager formula runs): ``x`` a dense float32 CPU tensor outside
        ``torch.compile`` (:func:`_eligible`), no graph being recorded (a double backward takes the eager path),
        every tensor argument of ``x``'s dtype and, if of ``x``'s shape, of its layout (an upstream gradient in
        another layout changes what the eager formula writes), and every output in ``x``'s layout (the sums that
        callers take over an output add in memory order, and a convolution after it may round differently in
        another layout). The native loop runs from :attr:`native_min_elements` where the native operators are on
        and built, the compiled kernel where :func:`fusable`. Tensors are passed detached."""
        tensors = [a for a in (x, *args) if isinstance(a, torch.Tensor)]
        if (torch.is_grad_enabled() or not _eligible(x) or any(t.dtype != x.dtype for t in tensors)
                or any(t.shape == x.shape and t.stride() != x.stride() for t in tensors)):
            return None
        detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in (x, *args)]
        result = None
        if self.native is not None and x.numel() >= self.native_min_elements and native.native_available():
            result = native.loop(self.native, *detached)
        if result is None and _compiled_on(x, self):
            result = self(*detached)
        if result is None:
            return None
        outputs = result if isinstance(result, tuple) else (result,)
        return result if all(out.stride() == x.stride() for out in outputs) else None


def _eligible(x: torch.Tensor) -> bool:
    """What every kernel needs: a dense (contiguous or channels_last) float32 CPU tensor, outside ``torch.compile``
    (a compiled network fuses the formula itself)."""
    return not torch.compiler.is_compiling() and native.dense_float32_cpu(x)


def _compiled_on(x: torch.Tensor, kernel: CompiledKernel) -> bool:
    if not _Settings.enabled or _Settings.failure is not None or kernel.failure is not None:
        return False
    return x.numel() >= (kernel.min_elements if _Settings.min_elements is None else _Settings.min_elements)


def fusable(x: torch.Tensor, kernel: CompiledKernel) -> bool:
    """Whether ``kernel``'s compiled form runs on ``x`` (else the caller's eager formula, which gives the same
    bits)."""
    return _eligible(x) and _compiled_on(x, kernel)


def _clip_between(x: torch.Tensor, clip: torch.Tensor | float) -> torch.Tensor:
    """``clamp(x, 0, a)`` with ``a > 0`` (a tensor or a number) as eager torch computes it, signed zero and NaN
    included."""
    return torch.where(x < 0, 0.0, torch.where(x > clip, clip, x))


def _pact_forward(x: torch.Tensor, clip: torch.Tensor, levels: float) -> torch.Tensor:
    return torch.round(_clip_between(x, clip) / clip * levels) / levels * clip


def _pact_backward(x: torch.Tensor, clip: torch.Tensor, grad: torch.Tensor,
                   levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    # g where 0 < x < a (threshold_backward's "x <= 0 gives 0", twice), and g * dy/da, which the caller sums
    grad_x = torch.where(x <= 0, 0.0, torch.where(clip - x <= 0, 0.0, grad))
    scaled = _clip_between(x, clip) / clip * levels
    dy_da = (torch.round(scaled) - scaled) / levels + (x >= clip).to(x.dtype)
    return grad_x, grad * dy_da


#: PACT's ``round(L clamp(x, 0, a) / a) / L * a`` (AdaBits' activation quantizer)
pact_forward = CompiledKernel(_pact_forward, min_elements=PACT_MIN_ELEMENTS, native="pact_forward")
#: PACT's gradient at ``x`` and the elementwise ``g dy/da`` whose sum is the gradient at ``a``
pact_backward = CompiledKernel(_pact_backward, min_elements=PACT_MIN_ELEMENTS, native="pact_backward")


def _bounded_forward(x: torch.Tensor, lower: torch.Tensor, inverse_gap: torch.Tensor,
                     levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    normalized = (x - lower) * inverse_gap
    return normalized, torch.round(_clip_between(normalized, 1.0) * levels) / levels


def _bounded_backward(normalized: torch.Tensor, inverse_gap: torch.Tensor, grad: torch.Tensor, below: float,
                      above: float) -> tuple[torch.Tensor, torch.Tensor]:
    # hardtanh_backward's "n <= below or n >= above gives 0", on g / (u - l); and its product with n, which the
    # caller sums for the bounds' gradients
    grad_normalized = torch.where((normalized <= below) | (normalized >= above), 0.0, grad * inverse_gap)
    return grad_normalized, grad_normalized * normalized


#: MBQuant's ``n = (x - l) / (u - l)`` (kept for the backward pass) and ``round(L clamp(n, 0, 1)) / L``
bounded_forward = CompiledKernel(_bounded_forward, min_elements=BOUNDED_MIN_ELEMENTS, native="bounded_forward",
                                 native_min_elements=NATIVE_BOUNDED_MIN_ELEMENTS)
#: MBQuant's straight-through gradient at ``n`` and its product with ``n``
bounded_backward = CompiledKernel(_bounded_backward, min_elements=BOUNDED_MIN_ELEMENTS, native="bounded_backward",
                                  native_min_elements=NATIVE_BOUNDED_MIN_ELEMENTS)
