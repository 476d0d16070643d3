"""Native CPU operators for the quantizers: C++ loops built on first use with ``torch.utils.cpp_extension``.

Three activation quantizers, each a chain of elementwise passes in eager PyTorch, get one loop forward and one
backward (``csrc/``): DoReFa's activation (below), PACT's (AdaBits; :mod:`methods.quant.pact`) and MBQuant's bounded
quantizer (:mod:`methods.quant.bounded`). PACT's and the bounded quantizer's loops run inside their Python autograd
functions, through the kernels of :mod:`methods.quant.kernels` (:func:`loop`), which try them before the compiled
forms, and inside C++ autograd nodes (:func:`pact_quantize`, :func:`bounded_quantize`), which take the place of the
Python functions where they can (the bounded quantizer's node keeps ``x`` and takes ``n`` from it again in its
backward pass, so its forward loop writes ``q`` alone). The sums that give a clipping level's or a bound's gradient
stay ATen's, over a product in the input's layout, so they add in the same order. Each loop does the eager passes'
IEEE operations in their order, so the same bits (the tests compare bit patterns).

Two weight quantizers, DoReFa's and SAT's, get operators over the list of a network's layers
(``csrc/weight_lists.cpp``, ``csrc/sat_weight_lists.cpp``; :func:`list_loop`): their terms once per step, the
forward pass and the backward pass per bit-width, one call each where the list operations made one call per
operation and layer; so does EMQ's bias correction on top of DoReFa's weights (``csrc/bias_correction.cpp``).

DoReFa's activation quantizer (Zhou et al., arXiv 1606.06160, Sec. 2.3;
:func:`methods.quant.dorefa.dorefa_activation`) runs at every quantized convolution of every bit-width of every
step of Any-Precision, dedicated and EMQ. In eager PyTorch it is ``hardtanh`` (a C++ autograd node) followed by
three in-place passes (product, rounding, division); ``mbqbench_native::clamp_round_unit``
(``csrc/clamp_round_unit.cpp``) makes one pass forward and records a C++ autograd node whose backward is the same
``hardtanh_backward``. It gives the same bits as the eager formula: the same IEEE operations in the same order (a
NaN passes through, ``-0.0`` stays ``-0.0``, rounding is half to even), compiled without fast-math; the tests
compare bit patterns, and every float32 bit pattern was compared once at bits 1, 2, 4 and 8 (``docs/benchmarks.md``).

A compiled (inductor) kernel does not pay here: its call costs about 0.1 ms of guards and wrappers, and the forward
inside a Python autograd function was no faster than the eager chain. A C++ operator costs a few microseconds to call.

The first use in a process loads the library, building it first if this torch has not built it before (about 20 s
on 2 cores; the build is cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and
reused while the source and torch stay the same). It needs a C++ compiler and ``ninja``. Where either is missing or
the build fails, one warning is given and the PyTorch formulas, which compute the same values, serve for the rest of
the process. ``MBQ_NATIVE_KERNELS=0`` in the environment, or :func:`native_kernels`, switches the native operators
off. They run on float32 CPU tensors outside ``torch.compile`` (a compiled network fuses the formula itself); they
have no forward-mode derivative (nothing in the suite uses one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

ENVIRONMENT_SWITCH = "MBQ_NATIVE_KERNELS"
EXTENSION_NAME = "mbqbench_native"
SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in (
    "clamp_round_unit.cpp", "pact.cpp", "bounded.cpp", "bounded_node.cpp", "weight_lists.cpp",
    "sat_weight_lists.cpp", "bias_correction.cpp"))


class _State:
    enabled: bool = os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"
    loaded: bool | None = None  # None until the first use tries to load the library
    failure: str | None = None  # why loading failed


@contextlib.contextmanager
def native_kernels(enabled: bool = True) -> Iterator[None]:
    """Switch the native operators on or off inside the block (process-wide, not per thread)."""
    previous = _State.enabled
    _State.enabled = enabled
    try:
        yield
    finally:
        _State.enabled = previous


def native_available() -> bool:
    """Whether the native operators are switched on and loaded (the first call loads them, building if needed)."""
    if not _State.enabled:
        return False
    if _State.loaded is None:
        _State.loaded = _load()
    return _State.loaded


def preload() -> None:
    """Load the native operators now, building them if needed: the builders of the networks that use them call this,
    so a first build (seconds) happens before the harness's timed phases rather than inside a method's."""
    native_available()


def _load() -> bool:
    # cpp_extension logs a warning at import on machines without CUDA, which says nothing about a CPU build
    extension_logger = logging.getLogger("torch.utils.cpp_extension")
    level = extension_logger.level
    extension_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(EXTENSION_NAME, [str(source) for source in SOURCES],
                           extra_cflags=["-O3", "-ffp-contract=off"], is_python_module=False, verbose=False)
        return True
    except Exception as error:  # noqa: BLE001 (no compiler, no ninja, a failed build: the PyTorch formulas serve)
        lines = str(error).strip().splitlines()
        _State.failure = f"{type(error).__name__}: {lines[0] if lines else ''}"
        warnings.warn(f"native quantizer kernels are off for this process ({_State.failure}); the PyTorch formulas "
                      "give the same values, more slowly", RuntimeWarning, stacklevel=3)
        return False
    finally:
        extension_logger.setLevel(level)


def clamp_round_unit(x: torch.Tensor, levels: int) -> torch.Tensor | None:
    """``round(levels * clamp(x, 0, 1)) / levels`` with the straight-through gradient inside ``(0, 1)``, from the
    native operator; None where it does not run (not a float32 CPU tensor, switched off or unavailable), and the
    caller's PyTorch formula then gives the same bits."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.compiler.is_compiling()
            or not native_available()):
        return None
    return torch.ops.mbqbench_native.clamp_round_unit(x, levels)


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor | None:
    """PACT's ``round(L clamp(x, 0, |alpha|) / |alpha|) / L * |alpha|`` (:func:`methods.quant.pact.pact_quantize`)
    from the native operator, whose C++ autograd node runs the PACT loops forward and backward (the backward's eager
    passes where the autograd function would take them: a recorded graph, an upstream gradient in another layout);
    None where it does not run (``x`` not a dense float32 CPU tensor or ``alpha`` not float32 on the CPU, under
    ``torch.compile``, switched off or unavailable), and the caller's autograd function then gives the same bits."""
    if not _node_runs(x, alpha):
        return None
    return torch.ops.mbqbench_native.pact_quantize(x, alpha, levels)


def bounded_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int, forward_min: int,
                     backward_min: int) -> torch.Tensor | None:
    """MBQuant's ``round(L clamp((x - l) / (u - l), 0, 1)) / L`` with plain STE
    (:func:`methods.quant.bounded.bounded_quantize`) from the native operator, whose C++ autograd node runs the
    bounded loops from ``forward_min`` / ``backward_min`` elements and the autograd function's eager passes, written
    in ATen, elsewhere; None where it does not run (``x`` not a dense float32 CPU tensor, a bound not float32 on the
    CPU, under ``torch.compile``, switched off or unavailable), and the caller's autograd function then gives the
    same bits."""
    if not _node_runs(x, lower, upper):
        return None
    return torch.ops.mbqbench_native.bounded_quantize(x, lower, upper, levels, forward_min, backward_min)


def _node_runs(x: torch.Tensor, *parameters: torch.Tensor) -> bool:
    """Where an operator with a C++ autograd node takes the place of its Python function: ``x`` a dense float32 CPU
    tensor, its parameters float32 on the CPU, outside ``torch.compile``, the operators on and built."""
    return (dense_float32_cpu(x) and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in parameters)
            and not torch.compiler.is_compiling() and native_available())


def dense_float32_cpu(x: torch.Tensor) -> bool:
    """A float32 CPU tensor, contiguous or channels_last: the layouts whose elementwise results the loops write in
    the input's layout."""
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


def loop(name: str, *args) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The ``mbqbench_native`` operator ``name`` (PACT's and the bounded quantizer's loops) on ``args``: the
    arguments of its formula in :mod:`methods.quant.kernels`, whose ``CompiledKernel.run_like`` decides where it
    runs."""
    return getattr(torch.ops.mbqbench_native, name)(*args)


def list_loop(name: str, *args) -> list[torch.Tensor] | tuple[list[torch.Tensor], ...] | None:
    """The ``mbqbench_native`` operator ``name`` over a list of layers' weights (DoReFa's and SAT's weight
    quantizers and the tanh-and-max backward they share; ``csrc/weight_lists.cpp``, ``csrc/sat_weight_lists.cpp``)
    on ``args``, or None where it does not
    run: switched off or unavailable, under ``torch.compile``, while autograd records a graph (a double backward),
    or where an input is not a contiguous float32 CPU tensor (the operator then answers an empty list). The caller's
    list operations, which give the same bits, run instead."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not native_available():
        return None
    result = getattr(torch.ops.mbqbench_native, name)(*args)
    first = result[0] if isinstance(result, tuple) else result
    return result if len(first) else None
