"""The straight-through mask kept in the compiled backward pass (methods.quant.backward_ops)."""

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

from methods.quant.backward_ops import clamp_unit_backward
from methods.quant.dorefa import _ClampQuantize

EDGES = [0.0, -0.0, 1.0, 0.5, -1e-45, 1e-45, 1.0000001, 0.99999994, float("inf"), -float("inf"), float("nan"), 3.0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_the_operator_gives_hardtanh_backwards_bits_in_the_gradients_layout(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5) * 0.7 + 0.5
    x.view(-1)[: len(EDGES)] = torch.tensor(EDGES)
    grad = torch.randn(2, 3, 4, 5)
    grad.view(-1)[::7] = -0.0
    if layout in ("channels_last", "mixed"):
        grad = grad.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = clamp_unit_backward(grad, x)
    assert torch.equal(_bits(out), _bits(torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0)))
    assert out.stride() == grad.stride()


@pytest.mark.parametrize("case", ["channels_last", "expanded", "bfloat16", "empty", "scalar", "grad_requires_grad"])
def test_the_operator_passes_torchs_custom_op_checks(case):
    """Fake and real implementation agree on shape, dtype and layout (which inductor relies on), and the registered
    derivative passes autograd's checks."""
    torch.manual_seed(3)
    x, grad = torch.rand(2, 3, 4, 5) * 1.4 - 0.2, torch.randn(2, 3, 4, 5)
    if case == "channels_last":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    elif case == "expanded":
        grad = torch.randn(1).expand(2, 3, 4, 5)
    elif case == "bfloat16":
        x, grad = x.bfloat16(), grad.bfloat16()
    elif case == "empty":
        x, grad = x[:0], grad[:0]
    elif case == "scalar":
        x, grad = torch.tensor(0.5), torch.tensor(-2.0)
    elif case == "grad_requires_grad":
        grad.requires_grad_(True)
    torch.library.opcheck(torch.ops.mbqbench.clamp_unit_backward.default, (grad, x))
    assert torch.equal(_bits(clamp_unit_backward(grad, x).float()),
                       _bits(torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0).float()))


def test_the_operators_own_gradient_is_hardtanh_backwards():
    """A double backward through the quantizer (a gradient penalty, say) differentiates the operator."""
    torch.manual_seed(2)
    x = torch.randn(3, 5) * 0.7 + 0.5
    grad = torch.randn(3, 5, requires_grad=True)
    upstream = torch.randn(3, 5)
    x.requires_grad_(True)
    ours = torch.autograd.grad(clamp_unit_backward(grad, x), (grad, x), upstream)
    theirs = torch.autograd.grad(torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0), (grad, x), upstream)
    for mine, reference in zip(ours, theirs):
        assert torch.equal(_bits(mine), _bits(reference))


def _saved_dtypes(fn, *inputs) -> list[torch.dtype]:
    """Dtypes of the forward values the backward graph reads (the forward graph's outputs past the user's), split
    as inductor splits them: its decompositions (``hardtanh_backward`` becomes comparisons and a ``where``) and its
    partitioner."""
    saved: list[torch.dtype] = []

    def forward_compiler(graph, example_inputs):
        (output,) = [node for node in graph.graph.nodes if node.op == "output"]
        values = [arg.meta["val"] for arg in output.args[0] if isinstance(arg, torch.fx.Node)]
        saved.extend(v.dtype for v in values[1:] if isinstance(v, torch.Tensor))
        return make_boxed_func(graph)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda graph, _: make_boxed_func(graph),
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    compiled(*inputs).sum().backward()
    return saved


def test_under_compile_the_relu_and_the_quantizer_save_the_float_input_and_no_mask():
    """A bool mask saved for the backward pass costs about ten times its eager time on CPU under inductor: the
    partitioner must keep the ReLU output (a float) and recompute both masks from it."""
    x = torch.randn(4, 3, 6, 6, requires_grad=True)

    def relu_then_quantize(x):
        return _ClampQuantize.apply(F.relu(x), 3) * 2

    saved = _saved_dtypes(relu_then_quantize, x)
    assert saved and torch.bool not in saved, saved


def test_compiled_quantizer_gradient_equals_the_eager_one():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8) * 0.7 + 0.5
    x.view(-1)[: len(EDGES) - 3] = torch.tensor(EDGES[:-3])  # up to +inf: torch.equal fails on a NaN
    grad = torch.randn(2, 4, 8, 8)

    def quantize(x):
        return _ClampQuantize.apply(x, 15)

    torch._dynamo.reset()
    compiled = torch.compile(quantize, fullgraph=True)
    results = []
    for fn in (quantize, compiled):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    assert torch.equal(compiled_out, eager_out)  # inductor's clamp makes -0.0 a 0.0: the forward's only difference
    assert torch.equal(_bits(compiled_grad), _bits(eager_grad))
    assert torch.equal(_bits(eager_grad), _bits(torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0)))
