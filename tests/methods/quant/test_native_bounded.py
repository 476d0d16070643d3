"""MBQuant's bounded quantizer as a native operator (methods/quant/native.py, csrc/bounded*.cpp) against the PyTorch
passes it replaces: the same bits forward and backward, over layouts, the gap clamp, one-sided gradients and the
double backward (Zhong et al., arXiv 2305.08117, Sec. 3.1: n = (x - l) / (u - l), round(L clamp(n, 0, 1)) / L)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from methods.quant import kernels, native
from methods.quant.bounded import bounded_quantize
from methods.quant.kernels import fused_kernels
from methods.quant.native import native_kernels
from methods.quant.pact import pact_quantize
from tests.methods.quant.test_native import BITS, bits_of

pytestmark = pytest.mark.skipif(not native.native_available(), reason=f"no native operators: {native._State.failure}")


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
