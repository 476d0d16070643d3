"""The native operators (methods/quant/native.py) against the PyTorch passes they replace: the same bits forward and
backward. DoReFa's activation (Zhou et al. 2016, Sec. 2.3: round(L clamp(x, 0, 1)) / L, straight-through inside
(0, 1)) and PACT's (Choi et al. 2018 in AdaBits' form: round(L clamp(x, 0, a) / a) / L * a, with its gradients at x and
at a). MBQuant's bounded quantizer: test_native_bounded.py."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from harness.registry import get_method
from methods.quant import kernels, native
from methods.quant.dorefa import dorefa_activation, dorefa_activation_reference
from methods.quant.kernels import fused_kernels
from methods.quant.native import native_kernels
from methods.quant.pact import pact_quantize

pytestmark = pytest.mark.skipif(not native.native_available(), reason=f"no native operators: {native._State.failure}")

BITS = range(1, 9)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def edge_values(levels: int) -> torch.Tensor:
    """NaNs of both signs and two payloads, signed zeros, infinities, subnormals, the clip points and their float
    neighbours, and every half step of the grid with its neighbours (where rounding half to even decides)."""
    nan_payload = torch.tensor([0x7FC00001, -0x003FFFFF], dtype=torch.int32).view(torch.float32)  # 0xFFC00001
    fixed = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 1e-38,
                          1.0, -1.0, 2.0, 1e30, -1e30])
    half_steps = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    grid = torch.cat((half_steps, torch.arange(levels + 1, dtype=torch.float64) / levels)).float()
    neighbours = torch.cat((grid, torch.nextafter(grid, torch.tensor(2.0)), torch.nextafter(grid, torch.tensor(-1.0))))
    clip_points = torch.tensor([0.0, 1.0])
    around_clip = torch.cat((torch.nextafter(clip_points, torch.tensor(2.0)),
                             torch.nextafter(clip_points, torch.tensor(-1.0))))
    return torch.cat((nan_payload, fixed, neighbours, around_clip))


def pytorch_formula(x: torch.Tensor, bits: int) -> torch.Tensor:
    with native_kernels(False):
        return dorefa_activation(x, bits)


def test_the_activation_runs_the_native_operator():
    x = torch.rand(8, requires_grad=True)
    assert type(dorefa_activation(x, 2).grad_fn).__name__ == "CppFunction"
    assert type(pytorch_formula(x, 2).grad_fn).__name__ == "HardtanhBackward0"


@pytest.mark.parametrize("bits", BITS)
def test_forward_and_backward_bits_equal_the_pytorch_formula(bits):
    torch.manual_seed(bits)
    values = torch.cat((edge_values(2**bits - 1), torch.randn(50_000) * 0.7 + 0.5, torch.rand(50_000)))
    native_x, formula_x = values.clone().requires_grad_(), values.clone().requires_grad_()
    quantized, expected = dorefa_activation(native_x, bits), pytorch_formula(formula_x, bits)
    assert torch.equal(bits_of(quantized), bits_of(expected))
    grad = torch.randn_like(values)
    grad[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-45])
    quantized.backward(grad)
    expected.backward(grad)
    assert torch.equal(bits_of(native_x.grad), bits_of(formula_x.grad))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_forward_bits_over_a_sweep_of_float_bit_patterns(bits):
    """Every 1021st float32 bit pattern (4.2M of them, all signs, exponents, NaNs and subnormals), and every pattern
    of [0.25, 0.5) (where 2-bit and 8-bit half steps lie; the grid's other half steps are in edge_values)."""
    sweep = torch.arange(-(2**31), 2**31, 1021, dtype=torch.int64).to(torch.int32)
    dense = torch.arange(0x3E800000, 0x3F000000, dtype=torch.int32)
    x = torch.cat((sweep, dense)).view(torch.float32)
    with torch.no_grad():
        assert torch.equal(bits_of(dorefa_activation(x, bits)), bits_of(pytorch_formula(x, bits)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "expanded", "sliced", "scalar",
                                    "empty"])
def test_layouts_give_the_formula_bits_and_strides(layout):
    torch.manual_seed(0)
    base = torch.randn(4, 6, 5, 3) * 0.8 + 0.4
    layouts = {"contiguous": lambda t: t, "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
               "transposed": lambda t: t.transpose(1, 3), "expanded": lambda t: t[:, :1].expand(4, 6, 5, 3),
               "sliced": lambda t: t[:, ::2], "scalar": lambda t: t[1, 2, 3, 1], "empty": lambda t: t[:0]}
    results = []
    for quantize in (dorefa_activation, pytorch_formula):
        leaf = base.clone().requires_grad_()
        quantized = quantize(layouts[layout](leaf), 4)
        quantized.backward(torch.arange(quantized.numel(), dtype=torch.float32).reshape(quantized.shape) / 7 - 3)
        results.append((quantized, leaf.grad))
    (quantized, grad), (expected, expected_grad) = results
    assert quantized.stride() == expected.stride()
    assert torch.equal(bits_of(quantized), bits_of(expected))
    assert torch.equal(bits_of(grad), bits_of(expected_grad))


def test_double_backward_equals_the_formula():
    torch.manual_seed(1)
    x, upstream_values = torch.randn(300) * 0.8 + 0.5, torch.randn(300)
    results = []
    for quantize in (dorefa_activation, pytorch_formula):
        leaf, upstream = x.clone().requires_grad_(), upstream_values.clone().requires_grad_()
        (grad,) = torch.autograd.grad(quantize(leaf, 3), leaf, upstream, create_graph=True)
        (second,) = torch.autograd.grad((grad * torch.arange(300.0)).sum(), upstream)
        results.append((grad, second))
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))


def test_no_graph_is_recorded_without_grad_or_in_inference_mode():
    x = torch.rand(100, requires_grad=True)
    expected = pytorch_formula(x, 5)
    with torch.no_grad():
        no_grad = dorefa_activation(x, 5)
    with torch.inference_mode():
        inference = dorefa_activation(x, 5)
    for out in (no_grad, inference):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(bits_of(out), bits_of(expected))


def test_other_dtypes_and_bad_levels():
    x = torch.rand(10, dtype=torch.float64)
    assert native.clamp_round_unit(x, 3) is None  # the caller's PyTorch formula serves
    assert torch.equal(dorefa_activation(x, 2), dorefa_activation_reference(x, 2))
    with pytest.raises(RuntimeError, match="levels must be at least 1"):
        torch.ops.mbqbench_native.clamp_round_unit(torch.rand(3), 0)


def test_switched_off_by_the_context_manager():
    x = torch.rand(10)
    with native_kernels(False):
        assert native.clamp_round_unit(x, 3) is None
    assert native.clamp_round_unit(x, 3) is not None


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native._State, "loaded", None)
    monkeypatch.setattr(native._State, "failure", None)
    monkeypatch.setattr(native, "SOURCES", (tmp_path / "missing.cpp",))
    x = torch.rand(50, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="native quantizer kernels are off"):
        assert native.clamp_round_unit(x, 3) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither retries nor warns
        out = dorefa_activation(x, 2)
    assert type(out.grad_fn).__name__ == "HardtanhBackward0"
    assert torch.equal(out, dorefa_activation_reference(x, 2))


def test_the_environment_switches_the_native_operators_off():
    code = "from methods.quant.native import native_available; print(native_available())"
    root = Path(__file__).resolve().parents[3]
    for value, expected in [("0", "False"), ("1", "True")]:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, native.ENVIRONMENT_SWITCH: value},
                             cwd=root, capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected


@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq", "adabits", "mbquant"])
def test_building_a_quantized_network_loads_the_operators_before_any_timed_phase(name, monkeypatch, synthetic):
    monkeypatch.setattr(native._State, "loaded", None)
    get_method(name)().build("resnet20", synthetic.info.num_classes, (2, 4), synthetic.info, 0.25)
    assert native._State.loaded is True


def pact_results(x: torch.Tensor, alpha: float, bits: int, grad: torch.Tensor, *, enabled: bool):
    """PACT's output, input gradient and clipping-level gradient with the native loops on, or with them and the
    compiled kernels off (the eager passes)."""
    leaf, level = x.detach().clone().requires_grad_(), torch.tensor(alpha, requires_grad=True)
    with native_kernels(enabled), fused_kernels(False):
        out = pact_quantize(leaf, level, bits)
        out.backward(grad.reshape(out.shape))
    return out, leaf.grad, level.grad


@pytest.mark.parametrize("alpha", [1.0, -2.5, 0.37, 6.0])
@pytest.mark.parametrize("bits", BITS)
def test_pact_forward_and_gradients_bits_equal_the_eager_passes(bits, alpha):
    torch.manual_seed(bits)
    clip = abs(alpha)
    levels = 2**bits - 1
    grid = torch.arange(levels + 1, dtype=torch.float64) / levels * clip
    half_steps = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels * clip
    points = torch.cat((grid, half_steps, torch.tensor([clip, 0.0], dtype=torch.float64))).float()
    neighbours = torch.cat((points, torch.nextafter(points, torch.tensor(1e9)), torch.nextafter(points,
                                                                                                torch.tensor(-1e9))))
    edges = torch.tensor([float("nan"), -float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, -1.0, 1e30])
    x = torch.cat((edges, neighbours, torch.randn(20_000) * clip + clip / 2))
    grad = torch.randn_like(x)
    grad[:3] = torch.tensor([-0.0, float("inf"), 1e-45])
    native_results = pact_results(x, alpha, bits, grad, enabled=True)
    eager_results = pact_results(x, alpha, bits, grad, enabled=False)
    for a, b in zip(native_results, eager_results):
        assert torch.equal(bits_of(a), bits_of(b))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
def test_pact_layouts_give_the_eager_bits_and_strides(layout):
    torch.manual_seed(0)
    base = torch.randn(4, 6, 5, 3) * 2
    views = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
             "transposed": lambda t: t.transpose(1, 3), "sliced": lambda t: t[:, ::2],
             "expanded": lambda t: t[:, :1].expand(4, 6, 5, 3)}
    results = []
    for enabled in (True, False):
        leaf, level = base.clone().requires_grad_(), torch.tensor(1.5, requires_grad=True)
        with native_kernels(enabled), fused_kernels(False):
            out = pact_quantize(views[layout](leaf), level, 3)
            out.backward(torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape) / 11 - 4)
        results.append((out, leaf.grad, level.grad))
    (out, grad_x, grad_alpha), (expected, expected_x, expected_alpha) = results
    assert out.stride() == expected.stride()
    for a, b in ((out, expected), (grad_x, expected_x), (grad_alpha, expected_alpha)):
        assert torch.equal(bits_of(a), bits_of(b))


def test_pact_loops_run_only_outside_a_recorded_graph():
    x, clip, grad = torch.rand(20), torch.tensor(0.5), torch.rand(20)
    forward, backward = kernels.pact_forward.run_like, kernels.pact_backward.run_like
    with fused_kernels(False):  # the native loops alone
        # a double backward records the backward pass: the eager passes serve
        assert forward(x, clip, 3.0) is None and backward(x, clip, grad, 3.0) is None
        with torch.no_grad():  # as inside the autograd function's forward and a plain backward
            assert forward(x, clip, 3.0) is not None and backward(x, clip, grad, 3.0) is not None
            assert backward(x.reshape(4, 5), clip, grad.reshape(5, 4).t(), 3.0) is None  # another layout


def test_pact_double_backward_equals_the_eager_passes():
    torch.manual_seed(2)
    x, upstream_values = torch.randn(200) * 2, torch.randn(200)
    results = []
    for enabled in (True, False):
        leaf, level = x.clone().requires_grad_(), torch.tensor(1.2, requires_grad=True)
        upstream = upstream_values.clone().requires_grad_()
        with native_kernels(enabled), fused_kernels(False):
            grads = torch.autograd.grad(pact_quantize(leaf, level, 2), (leaf, level), upstream, create_graph=True)
            second = torch.autograd.grad(grads[1] + (grads[0] * torch.arange(200.0)).sum(), upstream)
        results.append((*grads, *second))
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))


def test_pact_runs_the_native_node_on_dense_float32_cpu_inputs():
    x, alpha = torch.randn(4, 3, 5, 5, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = pact_quantize(x, alpha, 2)
        out.backward(torch.ones_like(out))  # out.sum()'s gradient would be an expanded one: the eager passes
    assert type(out.grad_fn).__name__ == "CppFunction"
    assert {"mbqbench_native::pact_forward", "mbqbench_native::pact_backward"} <= {e.name for e in prof.events()}
    channels_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert type(pact_quantize(channels_last, alpha, 2).grad_fn).__name__ == "CppFunction"
    assert type(pact_quantize(x.transpose(1, 3), alpha, 2).grad_fn).__name__ == "_PACTQuantizeBackward"
    assert type(pact_quantize(x.double(), alpha.double(), 2).grad_fn).__name__ == "_PACTQuantizeBackward"
    with native_kernels(False):
        assert type(pact_quantize(x, alpha, 2).grad_fn).__name__ == "_PACTQuantizeBackward"


@pytest.mark.parametrize("needs", ["x", "alpha"])
def test_pact_node_with_one_gradient_equals_the_autograd_function(needs):
    torch.manual_seed(4)
    values, upstream = torch.randn(6, 4, 3, 3) * 2, torch.randn(6, 4, 3, 3)
    results = []
    for enabled in (True, False):
        x, alpha = values.clone().requires_grad_(needs == "x"), torch.tensor(-1.3, requires_grad=needs == "alpha")
        with native_kernels(enabled), fused_kernels(False):
            out = pact_quantize(x, alpha, 3)
            (grad,) = torch.autograd.grad(out, x if needs == "x" else alpha, upstream)
        results.append((out, grad))
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))
