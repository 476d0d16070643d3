"""Straight-through helpers: clamp_ste's values are torch.clamp's bit for bit, its gradient the open-interval mask."""

import torch

from methods.quant.ste import clamp_ste


def test_clamp_ste_forward_is_torch_clamp_bit_for_bit_and_its_gradient_passes_strictly_inside():
    x = torch.tensor([float("nan"), -float("inf"), -2.0, -0.0, 0.0, 1e-45, 0.3, 1.0 - 2**-24, 1.0, 1.5, float("inf")],
                     requires_grad=True)
    out = clamp_ste(x, 0.0, 1.0)
    expected = torch.clamp(x.detach(), 0.0, 1.0)
    assert torch.equal(out.detach().view(torch.int32), expected.view(torch.int32))  # NaN and -0.0 included
    out.backward(torch.full_like(x, 3.0))
    # inside (0, 1): the subnormal, 0.3 and the float below 1; the bounds themselves and everything outside: 0
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0]


def test_clamp_ste_with_other_bounds():
    x = torch.tensor([-4.0, -3.5, 0.0, 2.0, 3.0], requires_grad=True)
    out = clamp_ste(x, -4.0, 3.0)
    assert out.tolist() == [-4.0, -3.5, 0.0, 2.0, 3.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
