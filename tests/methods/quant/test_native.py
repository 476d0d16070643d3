"""The native operators (methods/quant/native.py) against the PyTorch passes they replace: the same bits forward and
backward. DoReFa's activation (Zhou et al. 2016, Sec. 2.3: round(L clamp(x, 0, 1)) / L, straight-through inside
(0, 1)) and PACT's (Choi et al. 2018 in AdaBits' form: round(L clamp(x, 0, a) / a) / L * a, with its gradients at x and
at a)."""

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
from methods.quant.bounded import bounded_quantize
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


def bounded_results(x, lower, upper, upstream, bits: int, *, enabled: bool) -> list[torch.Tensor]:
    """MBQuant's bounded quantizer: the output and the gradients at x and both bounds, with the native loops on, or
    with them and the compiled kernels off (the eager passes)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper)]  # clone keeps the memory format
    with native_kernels(enabled), fused_kernels(False):
        out = bounded_quantize(*leaves, bits)
        out.backward(upstream)
    return [out, *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bits", BITS)
def test_bounded_forward_and_gradients_bits_equal_the_eager_passes(bits, memory_format, monkeypatch):
    bounded_loops_at_every_size(monkeypatch)
    generator = torch.Generator().manual_seed(bits)
    lower = torch.randn(1, 16, 1, 1, generator=generator) * 0.3 - 0.5
    upper = lower + torch.rand(1, 16, 1, 1, generator=generator) * 2
    upper[0, 3] = lower[0, 3]  # a collapsed pair: its gap is clamped and its n-terms vanish
    x = torch.randn(8, 16, 6, 6, generator=generator) * 2
    # at the bounds (the inclusive mask passes the gradient there), signed zeros, infinities, subnormals; no NaN,
    # where the eager mask's value depends on the element's position
    edges = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e-40, -1e-40, *lower.view(-1)[:4],
                          *upper.view(-1)[:4]])
    x.view(-1)[:len(edges)] = edges
    x.view(-1)[-len(edges):] = edges
    upstream = torch.randn(8, 16, 6, 6, generator=generator)
    upstream.view(-1)[:4] = torch.tensor([-0.0, float("inf"), -float("inf"), 1e-40])
    if memory_format == "channels_last":
        x, upstream = (t.contiguous(memory_format=torch.channels_last) for t in (x, upstream))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        native_results = bounded_results(x, lower, upper, upstream, bits, enabled=True)
    names = {event.name for event in prof.events()}  # the node ran both of its loops
    assert {"mbqbench_native::bounded_quantize", "mbqbench_native::bounded_quantized",
            "mbqbench_native::bounded_backward_from_input"} <= names
    eager_results = bounded_results(x, lower, upper, upstream, bits, enabled=False)
    for a, b in zip(native_results, eager_results):
        assert a.stride() == b.stride()
        assert torch.equal(bits_of(a), bits_of(b))


def test_bounded_weight_layout_and_fallbacks(monkeypatch):
    """A weight's bounds (one pair per branch, 5-d) run natively; a strided input or an upstream gradient in another
    layout, and EWGS scaling, take the eager passes; every case gives the eager bits."""
    bounded_loops_at_every_size(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 8, 8, 3, 3, generator=generator) * 0.1
    lower, upper = torch.full((4, 1, 1, 1, 1), -0.2), torch.full((4, 1, 1, 1, 1), 0.25)
    cases = [(weight, torch.randn(4, 8, 8, 3, 3, generator=generator), 0.0),
             (weight.transpose(1, 2), torch.randn(4, 8, 8, 3, 3, generator=generator).transpose(1, 2), 0.0),
             (weight, torch.randn(4, 8, 3, 3, 8, generator=generator).permute(0, 1, 4, 2, 3), 0.0),
             (weight, torch.randn(4, 8, 8, 3, 3, generator=generator), 0.3)]
    for x, upstream, delta in cases:
        results = []
        for enabled in (True, False):
            leaves = [t.detach().clone().requires_grad_() for t in (x, lower, upper)]
            with native_kernels(enabled), fused_kernels(False):
                out = bounded_quantize(*leaves, 2, backward_scaling=delta)
                out.backward(upstream)
            results.append([out, *(leaf.grad for leaf in leaves)])
        assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))


@pytest.mark.parametrize("bits", [2, 8])
def test_bounded_backward_from_the_kept_input_when_its_loop_declines(bits, monkeypatch):
    """The forward loop ran, so the node kept x, not n; a backward pass that does not take its loop (below its size
    threshold) takes n from x again in the eager pass: every result keeps the eager bits."""
    monkeypatch.setattr(kernels.bounded_forward, "native_min_elements", 1)
    monkeypatch.setattr(kernels.bounded_backward, "native_min_elements", 10**9)
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 8, 5, 5, generator=generator) * 2
    lower, upper = torch.full((1, 8, 1, 1), -0.6), torch.linspace(0.2, 1.5, 8).view(1, 8, 1, 1)
    upstream = torch.randn(4, 8, 5, 5, generator=generator)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        native_results = bounded_results(x, lower, upper, upstream, bits, enabled=True)
    names = {event.name for event in prof.events()}
    assert "mbqbench_native::bounded_quantized" in names
    assert "mbqbench_native::bounded_backward_from_input" not in names
    eager_results = bounded_results(x, lower, upper, upstream, bits, enabled=False)
    for a, b in zip(native_results, eager_results):
        assert torch.equal(bits_of(a), bits_of(b))


@pytest.mark.parametrize("loops", ["loops", "eager passes"])
def test_bounded_bound_steps_keep_the_eager_bits_at_the_gap_clamp(loops, monkeypatch):
    """The node's steps on the bounds themselves (1 / max(u - l, 1e-8) forward; the mask u - l >= 1e-8 and the two
    gradients backward) run as scalar loops for a pair of contiguous bounds of one shape: the same bits as the
    autograd function's ATen calls, at gaps on both sides of float32's 1e-8, collapsed, negative and infinite gaps,
    with the loops over x on or off (no NaN gap: its n is NaN, where the eager mask depends on the position)."""
    if loops == "loops":
        bounded_loops_at_every_size(monkeypatch)
    tiny = torch.tensor(1e-8, dtype=torch.float32)
    gaps = torch.stack([tiny, torch.nextafter(tiny, torch.tensor(0.0)), torch.nextafter(tiny, torch.tensor(1.0)),
                        torch.tensor(0.0), torch.tensor(-0.3), torch.tensor(5e-9), torch.tensor(0.7),
                        torch.tensor(float("inf")), torch.tensor(1e30), torch.tensor(2.5)])
    lower = torch.linspace(-1.0, 0.2, len(gaps)).view(1, -1, 1, 1)
    lower[0, :3] = 0.0  # the gaps near 1e-8 exactly, and inputs in their middle: n = 0.5, a gradient to pass
    upper = lower + gaps.view(1, -1, 1, 1)
    upper.view(-1)[-3] = float("inf")  # an infinite bound as well as an infinite gap
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, len(gaps), 4, 4, generator=generator)
    x[:, :3] = gaps[:3].view(1, 3, 1, 1) * 0.5
    upstream = torch.randn(3, len(gaps), 4, 4, generator=generator)
    native_results = bounded_results(x, lower, upper, upstream, 3, enabled=True)
    eager_results = bounded_results(x, lower, upper, upstream, 3, enabled=False)
    for a, b in zip(native_results, eager_results):
        assert torch.equal(bits_of(a), bits_of(b))
    # the edge itself: float32's 1e-8 counts as an open gap (compared as float), the float below it as collapsed,
    # whose n-term (the upper bound's whole gradient) vanishes
    grad_upper = native_results[3].view(-1)
    assert grad_upper[0] != 0 and grad_upper[1] == 0 and grad_upper[2] != 0


def test_bounded_double_backward_equals_the_autograd_function(monkeypatch):
    """A double backward through the node (which kept x, the forward loop having run) records the eager backward
    pass with n taken from x without a history, as the autograd function's saved n has none: the same gradients
    and second derivatives, at the upstream gradient and at x and the bounds (none); an upstream gradient that
    itself needs a gradient works on both paths."""
    bounded_loops_at_every_size(monkeypatch)
    torch.manual_seed(5)
    values, upstream_values = torch.randn(2, 4, 3, 3) * 2, torch.randn(2, 4, 3, 3)
    results = []
    for enabled in (True, False):
        leaves = [values.clone().requires_grad_(), torch.full((1, 4, 1, 1), -0.7, requires_grad=True),
                  torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1).requires_grad_()]
        upstream = upstream_values.clone().requires_grad_()
        with native_kernels(enabled), fused_kernels(False):
            out = bounded_quantize(*leaves, 3)
            assert (type(out.grad_fn).__name__ == "CppFunction") == enabled
            grads = torch.autograd.grad(out, leaves, upstream, create_graph=True)
            total = grads[1].sum() + grads[2].sum() + (grads[0] * torch.arange(72.0).view(2, 4, 3, 3)).sum()
            second = torch.autograd.grad(total, [upstream, *leaves], allow_unused=True)
        assert all(grad is None for grad in second[1:])  # no history through n
        results.append((*grads, second[0]))
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))


def test_bounded_node_keeps_its_input_instead_of_a_normalized_copy(monkeypatch):
    """Where the forward loop runs, the only tensor of x's size the node keeps for the backward pass is x itself
    (n is taken from it again); the eager passes keep a fresh n."""
    bounded_loops_at_every_size(monkeypatch)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    lower = torch.full((1, 4, 1, 1), -0.5, requires_grad=True)
    upper = torch.full((1, 4, 1, 1), 0.7, requires_grad=True)

    def kept_full_size(enabled: bool) -> list[bool]:
        kept = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.shape == x.shape:
                kept.append(t.data_ptr() == x.data_ptr())
            return t

        with native_kernels(enabled), fused_kernels(False), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bounded_quantize(x, lower, upper, 4).sum().backward()
        return kept

    assert kept_full_size(True) == [True]
    assert kept_full_size(False) == [False]


def test_bounded_runs_the_native_node_where_its_autograd_function_would_run():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    lower, upper = torch.full((1, 4, 1, 1), -0.5, requires_grad=True), torch.full((1, 4, 1, 1), 0.7)
    assert type(bounded_quantize(x, lower, upper, 2).grad_fn).__name__ == "CppFunction"
    python_function = "_BoundedQuantizeBackward"
    assert type(bounded_quantize(x[:, :, ::2], lower, upper, 2).grad_fn).__name__ == python_function
    assert type(bounded_quantize(x, lower, upper, 2, backward_scaling=0.2).grad_fn).__name__ == python_function
    with native_kernels(False):
        assert type(bounded_quantize(x, lower, upper, 2).grad_fn).__name__ == python_function


@pytest.mark.parametrize("loops_from", ["every size", "default"])
def test_native_nodes_without_autograd_give_the_same_values(loops_from, monkeypatch):
    """Under inference mode the operators run their CPU kernels (no node): the autograd functions' values."""
    if loops_from == "every size":
        bounded_loops_at_every_size(monkeypatch)
    x = torch.randn(8, 16, 6, 6) * 2
    lower, upper, alpha = torch.full((1, 16, 1, 1), -0.4), torch.full((1, 16, 1, 1), 0.9), torch.tensor(1.7)
    results = []
    for enabled in (True, False):
        with native_kernels(enabled), fused_kernels(False), torch.inference_mode():
            results.append((bounded_quantize(x, lower, upper, 3), pact_quantize(x, alpha, 3)))
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))


def test_bounded_loops_skip_small_tensors():
    x, lower, gap = torch.rand(2, 8, 4, 4), torch.zeros(1, 8, 1, 1), torch.ones(1, 8, 1, 1)
    forward = kernels.bounded_forward.run_like
    with torch.no_grad(), fused_kernels(False):  # the native loops alone
        assert x.numel() < kernels.NATIVE_BOUNDED_MIN_ELEMENTS and forward(x, lower, gap, 3.0) is None
        big = torch.rand(kernels.NATIVE_BOUNDED_MIN_ELEMENTS // 128, 8, 4, 4)
        assert forward(big, lower, gap, 3.0) is not None


def bounded_loops_at_every_size(monkeypatch) -> None:
    """The bounded quantizer's native loops from one element (the tests' tensors are small)."""
    for kernel in (kernels.bounded_forward, kernels.bounded_backward):
        monkeypatch.setattr(kernel, "native_min_elements", 1)
