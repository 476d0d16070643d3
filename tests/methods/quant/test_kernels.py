"""The compiled quantizer kernels against the eager formulas, bit for bit (methods/quant/kernels.py); the native
operators, which PACT tries first, are switched off here (tests/methods/quant/test_native.py tests them)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from methods.quant import kernels
from methods.quant.bounded import bounded_quantize
from methods.quant.kernels import CompiledKernel, fusable, fused_kernels
from methods.quant.native import native_kernels
from methods.quant.pact import pact_quantize

BITS = [1, 2, 3, 4, 5, 6, 7, 8, 32]
LAYOUTS = ["contiguous", "channels_last"]
# the values where a clamp, a rounding or a comparison could tell two implementations apart
EDGES = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-40, 0.5, 1.0, 3.0, -3.0]


@pytest.fixture(autouse=True)
def without_native_operators():
    with native_kernels(False):
        yield


@pytest.fixture
def kernel_runs(monkeypatch):
    """How many kernel calls returned a result (a kernel that was not used cannot pass a test by default)."""
    runs = {"count": 0}
    call = CompiledKernel.__call__

    def counted(self, *args):
        result = call(self, *args)
        runs["count"] += result is not None
        return result

    monkeypatch.setattr(CompiledKernel, "__call__", counted)
    return runs


def bit_patterns(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if name == "channels_last" else t.contiguous()


def with_edges(x: torch.Tensor, *more: float) -> torch.Tensor:
    """``x`` with the edge values at its start and at its end (a vectorized loop's body and its scalar tail)."""
    x = x.clone()
    values = torch.tensor(EDGES + list(more))
    x.view(-1)[: len(values)] = values
    x.view(-1)[-len(values):] = values
    return x


def run(quantizer, inputs: list[torch.Tensor], upstream: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    """The output and every input's gradient, with the kernels on (from one element) or off."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]  # clone keeps the memory format
    with fused_kernels(fused, min_elements=1):
        out = quantizer(*leaves)
        out.backward(upstream)
    return [out, *(leaf.grad for leaf in leaves)]


def assert_same_bits(fused: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    for index, (a, b) in enumerate(zip(fused, eager)):
        assert a.stride() == b.stride(), index
        assert torch.equal(bit_patterns(a), bit_patterns(b)), index


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
def test_pact_kernels_give_the_eager_bits(bits, memory_format, kernel_runs):
    generator = torch.Generator().manual_seed(bits)
    alpha = torch.tensor(-1.3 if bits % 2 else 0.9)  # the clipping level is |alpha|
    x = layout(with_edges(torch.randn(8, 16, 5, 7, generator=generator) * 2, abs(alpha.item())), memory_format)
    upstream = layout(with_edges(torch.randn(8, 16, 5, 7, generator=generator)), memory_format)
    upstream[upstream.isnan()] = 0.5  # a NaN upstream makes the alpha gradient NaN either way

    def quantizer(x, a):
        return pact_quantize(x, a, bits)

    fused = run(quantizer, [x, alpha], upstream, fused=True)
    assert kernel_runs["count"] == 2  # forward and backward
    assert_same_bits(fused, run(quantizer, [x, alpha], upstream, fused=False))


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
def test_bounded_kernels_give_the_eager_bits(bits, memory_format, kernel_runs):
    generator = torch.Generator().manual_seed(bits)
    lower = torch.randn(1, 16, 1, 1, generator=generator) * 0.3 - 0.5
    upper = lower + torch.rand(1, 16, 1, 1, generator=generator) * 2
    upper[0, 3] = lower[0, 3]  # a collapsed bound pair: the gap is clamped and its n-terms vanish
    # inputs exactly at some bounds: the inclusive mask passes the gradient there; no NaN input (the eager mask's
    # value at a NaN depends on its position, see inclusive_unit_mask_backward)
    x = with_edges(torch.randn(8, 16, 6, 6, generator=generator) * 2, *lower.view(-1)[:4], *upper.view(-1)[:4])
    x[x.isnan()] = 0.25
    x, upstream = layout(x, memory_format), layout(with_edges(torch.randn(8, 16, 6, 6, generator=generator)),
                                                   memory_format)
    upstream[upstream.isnan()] = 0.5

    def quantizer(x, lower, upper):
        return bounded_quantize(x, lower, upper, bits)

    fused = run(quantizer, [x, lower, upper], upstream, fused=True)
    assert kernel_runs["count"] == 2
    assert_same_bits(fused, run(quantizer, [x, lower, upper], upstream, fused=False))


def test_upstream_gradient_in_another_layout_takes_the_eager_backward(kernel_runs):
    x = torch.randn(4, 8, 5, 5)
    upstream = layout(torch.randn(4, 8, 5, 5), "channels_last")
    fused = run(lambda x, a: pact_quantize(x, a, 4), [x, torch.tensor(1.0)], upstream, fused=True)
    assert kernel_runs["count"] == 1  # the forward pass only: the sum of g dy/da adds in memory order
    assert_same_bits(fused, run(lambda x, a: pact_quantize(x, a, 4), [x, torch.tensor(1.0)], upstream, fused=False))


def test_kernels_run_without_gradient_too(kernel_runs):
    x, alpha = torch.randn(4, 8, 5, 5), torch.tensor(0.8)
    with torch.no_grad(), fused_kernels(True, min_elements=1):
        fused = pact_quantize(x, alpha, 3)
    with torch.no_grad(), fused_kernels(False):
        eager = pact_quantize(x, alpha, 3)
    assert kernel_runs["count"] == 1 and torch.equal(bit_patterns(fused), bit_patterns(eager))


@pytest.mark.parametrize("case", ["small", "float64", "strided", "switched off"])
def test_where_no_kernel_runs(case):
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "strided":
        x = x[:, ::2]
    with fused_kernels(case != "switched off", min_elements=10**9 if case == "small" else 1):
        assert not fusable(x, kernels.pact_forward)
    with fused_kernels(True, min_elements=1):
        assert fusable(torch.randn(4, 8, 5, 5), kernels.pact_forward)


def test_each_kernel_runs_from_its_own_size():
    with fused_kernels(True):  # whatever MBQ_FUSED_KERNELS says
        assert not fusable(torch.randn(kernels.PACT_MIN_ELEMENTS - 1), kernels.pact_forward)
        assert fusable(torch.randn(kernels.PACT_MIN_ELEMENTS), kernels.pact_forward)
        assert not fusable(torch.randn(kernels.BOUNDED_MIN_ELEMENTS - 1), kernels.bounded_forward)
        assert fusable(torch.randn(kernels.BOUNDED_MIN_ELEMENTS), kernels.bounded_forward)


def test_a_failed_compile_warns_once_and_leaves_the_eager_formula(monkeypatch):
    def no_compiler(*args, **kwargs):
        inner = RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
        raise torch._dynamo.exc.BackendCompilerFailed(no_compiler, inner, None)

    monkeypatch.setattr(kernels._Settings, "failure", None)
    monkeypatch.setattr(torch, "compile", no_compiler)
    kernel = CompiledKernel(lambda x: x + 1, min_elements=1)
    with pytest.warns(RuntimeWarning, match="kernels are off for this process .*; the eager formulas"):
        assert kernel(torch.zeros(3)) is None
    assert kernels._Settings.failure.startswith("BackendCompilerFailed")
    assert not fusable(torch.zeros(3), kernel)  # every kernel, for the rest of the process
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next calls say nothing
        assert kernel(torch.zeros(3)) is None
        x, alpha = torch.randn(4, 8, 5, 5), torch.tensor(1.0)
        with fused_kernels(True, min_elements=1):
            assert torch.equal(pact_quantize(x, alpha, 4), pact_quantize(x.clone(), alpha, 4))


def test_an_error_in_one_kernel_turns_off_that_kernel_only(monkeypatch):
    monkeypatch.setattr(kernels._Settings, "failure", None)

    def fails(x):
        raise ValueError("\n")  # a message of white space only: the warning still forms

    broken, working = CompiledKernel(fails, min_elements=1), CompiledKernel(lambda x: x + 1, min_elements=1)
    with pytest.warns(RuntimeWarning, match="the compiled kernel fails is off for this process"):
        assert broken(torch.zeros(3)) is None
    assert broken.failure is not None and kernels._Settings.failure is None
    with fused_kernels(True, min_elements=1):
        assert not fusable(torch.zeros(3), broken) and fusable(torch.zeros(3), working)
    assert torch.equal(working(torch.zeros(3)), torch.ones(3))


def test_the_environment_switches_the_kernels_off():
    code = "from methods.quant.kernels import _Settings; print(_Settings.enabled)"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    for value, expected in [("0", "False"), ("1", "True")]:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MBQ_FUSED_KERNELS": value}, cwd=root,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected


def test_past_dynamos_variant_limit_a_call_runs_eager_and_the_kernels_stay_on(monkeypatch):
    monkeypatch.setattr(kernels._Settings, "failure", None)
    kernel = CompiledKernel(lambda x: x * 2, min_elements=1)
    kernel.variant_limit = 1
    assert torch.equal(kernel(torch.ones(3)), torch.full((3,), 2.0))
    assert kernel(torch.ones(2, 3)) is None  # another rank: a second variant
    assert kernels._Settings.failure is None and kernel.failure is None
    assert torch.equal(kernel(torch.ones(5)), torch.full((5,), 2.0))  # the first variant keeps running


@pytest.mark.parametrize("needs", ["input", "alpha"])
def test_pact_with_one_gradient_takes_the_eager_backward(needs, kernel_runs):
    x, alpha = torch.randn(4, 8, 5, 5), torch.tensor(0.9)
    upstream = torch.randn(4, 8, 5, 5)
    results = []
    for fused in (True, False):
        leaves = [x.clone().requires_grad_(needs == "input"), alpha.clone().requires_grad_(needs == "alpha")]
        with fused_kernels(fused, min_elements=1):
            pact_quantize(*leaves, 3).backward(upstream)
        results.append([leaf.grad for leaf in leaves if leaf.requires_grad])
    assert kernel_runs["count"] == 1  # the forward pass only
    assert_same_bits(*results)


def test_a_double_backward_takes_the_eager_path(kernel_runs):
    x, alpha = torch.randn(4, 8, 5, 5), torch.tensor(0.9)
    results = []
    for fused in (True, False):
        leaf, level = x.clone().requires_grad_(), alpha.clone().requires_grad_()
        with fused_kernels(fused, min_elements=1):
            (grad_x,) = torch.autograd.grad(pact_quantize(leaf, level, 3).square().sum(), leaf, create_graph=True)
            grad_x.sum().backward()  # through the eager backward, whose clip has a bound with gradient
        results.append([grad_x, level.grad])
    # the forward pass, and the second backward's way back through the quantizer (without create_graph); the first
    # backward, which builds a graph, is eager
    assert kernel_runs["count"] == 2
    assert_same_bits(*results)


def test_bounded_with_gradient_scaling_takes_the_eager_backward(kernel_runs):
    generator = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(4, 8, 5, 5, generator=generator), torch.randn(4, 8, 5, 5, generator=generator)
    lower, upper = torch.full((1, 8, 1, 1), -0.5), torch.full((1, 8, 1, 1), 1.5)

    def quantizer(x, lower, upper):
        return bounded_quantize(x, lower, upper, 3, backward_scaling=0.2)

    fused = run(quantizer, [x, lower, upper], upstream, fused=True)
    assert kernel_runs["count"] == 1  # EWGS scaling is not in the kernel
    assert_same_bits(fused, run(quantizer, [x, lower, upper], upstream, fused=False))


def test_bounded_upstream_in_another_layout_takes_the_eager_backward(kernel_runs):
    x, upstream = torch.randn(4, 8, 5, 5), layout(torch.randn(4, 8, 5, 5), "channels_last")
    lower, upper = torch.full((1, 8, 1, 1), -0.5), torch.full((1, 8, 1, 1), 1.5)

    def quantizer(x, lower, upper):
        return bounded_quantize(x, lower, upper, 3)

    fused = run(quantizer, [x, lower, upper], upstream, fused=True)
    assert kernel_runs["count"] == 1
    assert_same_bits(fused, run(quantizer, [x, lower, upper], upstream, fused=False))
