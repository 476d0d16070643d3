"""Every quantizer's autograd function under ``torch.compile``: the eager forward and gradients, and a forward pass
that writes no intermediate in place.

torch 2.11 (the GPU machines' image) compiles an autograd function whose forward pass works in place on its own
intermediate (``x.clamp(0, 1).mul_(L).round_()``) into a backward pass that returns zeros; torch 2.14 does not. The
forward passes are written out of place, with the same values; the first test would show the zeros on 2.11, the
second keeps in-place steps out of the forward passes on any version.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from methods.quant.bounded import _BoundedQuantize
from methods.quant.dorefa import _ClampQuantize, _DoReFaWeight
from methods.quant.kernels import fused_kernels
from methods.quant.lsq import _LSQQuantize
from methods.quant.native import native_kernels
from methods.quant.pact import _PACTQuantize

# name -> (function of (x, parameters), the parameters' values)
CASES = {
    "dorefa activation": (lambda x, p: _ClampQuantize.apply(x, 15), []),
    "dorefa weight": (lambda x, p: _DoReFaWeight.apply(x, 2), []),
    "lsq": (lambda x, p: _LSQQuantize.apply(x * 3, p[0], 4, 3, 0.1), [torch.tensor(0.4)]),
    "pact": (lambda x, p: _PACTQuantize.apply(x, p[0], 15), [torch.tensor(0.8)]),
    "bounded": (lambda x, p: _BoundedQuantize.apply(x, p[0], p[1], 3, 0.0),
                [torch.full((1, 6, 1, 1), -0.1), torch.full((1, 6, 1, 1), 0.9)]),
}


def run(function, parameters, x, upstream, compiled: bool) -> list[torch.Tensor]:
    torch._dynamo.reset()
    leaf = x.clone().requires_grad_()
    leaves = [p.clone().requires_grad_() for p in parameters]
    out = (torch.compile(function, fullgraph=True) if compiled else function)(leaf, leaves)
    out.backward(upstream)
    return [out.detach(), leaf.grad, *(p.grad for p in leaves)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_compiled_function_gives_the_eager_values_and_gradients(name):
    function, parameters = CASES[name]
    torch.manual_seed(0)
    x = torch.rand(4, 6, 5, 5) * 1.6 - 0.3
    upstream = torch.randn_like(x)
    with native_kernels(False), fused_kernels(False):  # the Python functions themselves
        eager = run(function, parameters, x, upstream, compiled=False)
        compiled = run(function, parameters, x, upstream, compiled=True)
    assert eager[1].count_nonzero() > 0
    for ours, theirs in zip(compiled, eager):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


class _InPlaceSteps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            self.steps.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_forward_pass_writes_nothing_in_place(name):
    function, parameters = CASES[name]
    x = torch.rand(4, 6, 5, 5, requires_grad=True)
    leaves = [p.clone().requires_grad_() for p in parameters]
    with native_kernels(False), fused_kernels(False), _InPlaceSteps() as mode:
        function(x, leaves)
    assert mode.steps == []
