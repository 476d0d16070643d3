"""EMQ's shared BN: one module for every bit-width but 1; BN adaptation's per-bit statistics, no weight change."""

import pytest
import torch
from torch import nn

from harness.errors import ConfigError
from methods.quant.modules import BitSwitchable
from methods.quant.shared_bn import SharedBatchNorm2d, adapt_batchnorm


class ScaleByBits(BitSwitchable, nn.Module):
    """Multiplies its input by the active bit-width: a stand-in for a bit-dependent quantized layer."""

    def __init__(self) -> None:
        super().__init__()
        self.bits = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.bits


def test_one_bn_serves_every_bit_width_but_one():
    bn = SharedBatchNorm2d(3, (1, 2, 4, 8))
    assert sorted(bn.norms) == ["binary", "shared"]
    assert bn.norm_for(2) is bn.norm_for(4) is bn.norm_for(8) is bn.norm_for(3)  # 3: untrained, still served
    assert bn.norm_for(1) is not bn.norm_for(2)
    forced = SharedBatchNorm2d(3, (1, 2, 4, 8), share_binary=True)
    assert list(forced.norms) == ["shared"] and forced.norm_for(1) is forced.norm_for(8)
    separate = SharedBatchNorm2d(3, (2, 4), mode="separate")
    assert separate.norm_for(2) is not separate.norm_for(4)
    with pytest.raises(ConfigError, match="no batch norm for 3 bits"):
        separate.set_bits(3)
    without_binary = SharedBatchNorm2d(3, (2, 4))
    with pytest.raises(ConfigError, match="no batch norm for 1 bits"):
        without_binary.set_bits(1)


def test_training_at_any_shared_bit_width_updates_the_one_shared_bn():
    bn = SharedBatchNorm2d(2, (1, 2, 8)).train()
    bn.set_bits(2)
    bn(torch.randn(4, 2, 3, 3) + 3.0)
    assert torch.all(bn.norms["shared"].running_mean > 0.1)
    assert torch.equal(bn.norms["binary"].running_mean, torch.zeros(2))


def test_training_forward_is_batch_norm_on_the_batch_and_gamma_beta_sum_every_bit_widths_gradient():
    """Train mode: each bit-width's forward is exactly BN with that batch's statistics and the shared affine
    parameters; gamma and beta receive the sum of the per-bit-width gradients (one parameter, three losses)."""
    torch.manual_seed(0)
    bn = SharedBatchNorm2d(3, (2, 4, 8)).train()
    with torch.no_grad():
        bn.norms["shared"].weight.copy_(torch.tensor([1.5, 0.5, -0.75]))
        bn.norms["shared"].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    inputs = {b: torch.randn(5, 3, 2, 2) * b + b for b in (8, 4, 2)}
    gamma, beta = bn.norms["shared"].weight, bn.norms["shared"].bias
    expected_gamma, expected_beta = torch.zeros(3), torch.zeros(3)
    for b, x in inputs.items():
        bn.set_bits(b)
        out = bn(x)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), correction=0, keepdim=True)
        normalized = (x - mean) / torch.sqrt(var + bn.norms["shared"].eps)
        torch.testing.assert_close(out, normalized * gamma.view(1, 3, 1, 1) + beta.view(1, 3, 1, 1),
                                   atol=1e-6, rtol=1e-6)
        weights = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape) / out.numel()
        (out * weights).sum().backward()
        # d/dgamma of sum(weights * (gamma xhat + beta)) = sum(weights * xhat); d/dbeta = sum(weights)
        expected_gamma += (weights * normalized).sum(dim=(0, 2, 3)).detach()
        expected_beta += weights.sum(dim=(0, 2, 3))
    torch.testing.assert_close(gamma.grad, expected_gamma, atol=1e-5, rtol=1e-5)
    # float sums in another order than autograd's: equal to rounding, not bit for bit
    torch.testing.assert_close(beta.grad, expected_beta, atol=0, rtol=1e-6)


def test_adaptation_stores_cumulative_per_bit_statistics_and_changes_no_weight():
    torch.manual_seed(0)
    model = nn.Sequential(ScaleByBits(), SharedBatchNorm2d(2, (2, 4)))
    bn = model[1]
    with torch.no_grad():
        bn.norms["shared"].weight.copy_(torch.tensor([1.5, 0.5]))
        bn.norms["shared"].bias.copy_(torch.tensor([0.1, -0.2]))
    model.train()
    model(torch.randn(8, 2, 2, 2))  # some training-time running statistics to be restored afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 2, 3, 3) + 1.0, torch.randn(4, 2, 3, 3) - 2.0]
    model.eval()
    adapt_batchnorm(model, (2, 3, 4), batches)
    assert not model.training  # mode restored

    for b in (2, 3, 4):
        scaled = [x * b for x in batches]
        # momentum None: the cumulative average of the per-batch statistics (unbiased variance, as BN keeps it)
        mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in scaled]).mean(dim=0)
        var = torch.stack([x.var(dim=(0, 2, 3)) for x in scaled]).mean(dim=0)
        torch.testing.assert_close(bn.adapted_mean[b - 1], mean)
        torch.testing.assert_close(bn.adapted_var[b - 1], var)
        bn.set_bits(b)
        model[0].set_bits(b)
        x = torch.randn(2, 2, 3, 3)
        expected = (x * b - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.norms["shared"].eps)
        expected = expected * torch.tensor([1.5, 0.5]).view(1, -1, 1, 1) + torch.tensor([0.1, -0.2]).view(1, -1, 1, 1)
        torch.testing.assert_close(model(x), expected)
    assert bn.adapted.nonzero().flatten().tolist() == [1, 2, 3]

    after = model.state_dict()
    untouched = [k for k in before if not k.startswith("1.adapted")]
    assert all(torch.equal(before[k], after[k]) for k in untouched)  # gamma, beta and running statistics
    assert bn.norms["shared"].momentum == 0.1


def test_storage_counts_gamma_beta_once_per_group_and_statistics_per_bit_width():
    bn = SharedBatchNorm2d(10, (1, 2, 4, 8))
    assert bn.storage_bits(4) == 4 * 10 * 32
    # groups shared + binary: 2 x (gamma, beta); 4 bit-widths x (mean, var)
    assert bn.storage_bits_total((1, 2, 4, 8)) == (2 * 2 + 4 * 2) * 10 * 32
    separate = SharedBatchNorm2d(10, (2, 4), mode="separate")
    assert separate.storage_bits_total((2, 4)) == 2 * 4 * 10 * 32


def _train_steps(bn: SharedBatchNorm2d, bits_order: tuple[int, ...], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = []
    weights = torch.linspace(-1.0, 2.0, inputs[0].numel()).reshape(inputs[0].shape)
    for b, x in zip(bits_order, inputs):
        bn.set_bits(b)
        out = bn(x)
        (out * weights).sum().backward()
        outputs.append(out.detach())
    return outputs


@pytest.mark.parametrize("momentum", [0.1, None])
def test_mean_gradient_mode_divides_the_shared_gradient_by_its_sharers_and_changes_nothing_else(momentum):
    torch.manual_seed(0)
    inputs = [torch.randn(6, 3, 4, 4) * s + s for s in (1.0, 2.0, 3.0)]
    order = (8, 4, 2)
    summed = SharedBatchNorm2d(3, (1, 2, 4, 8), momentum=momentum).train()
    mean = SharedBatchNorm2d(3, (1, 2, 4, 8), momentum=momentum, grad="mean").train()
    mean.load_state_dict(summed.state_dict())
    out_sum, out_mean = _train_steps(summed, order, inputs), _train_steps(mean, order, inputs)
    # forward passes and running statistics: bit for bit the plain BatchNorm2d's
    assert all(torch.equal(a, b) for a, b in zip(out_sum, out_mean))
    for name, value in summed.state_dict().items():
        assert torch.equal(value, mean.state_dict()[name]), name
    # three bit-widths share the BN: each backward contributes a third of its gradient
    shared_sum, shared_mean = summed.norms["shared"], mean.norms["shared"]
    torch.testing.assert_close(shared_mean.weight.grad, shared_sum.weight.grad / 3, atol=0, rtol=1e-6)
    torch.testing.assert_close(shared_mean.bias.grad, shared_sum.bias.grad / 3, atol=0, rtol=1e-6)


def test_mean_gradient_mode_is_exact_for_two_sharers_and_leaves_a_lone_bit_width_alone():
    torch.manual_seed(1)
    inputs = [torch.randn(5, 2, 3, 3) + k for k in range(3)]
    summed = SharedBatchNorm2d(2, (1, 2, 4)).train()
    mean = SharedBatchNorm2d(2, (1, 2, 4), grad="mean").train()
    mean.load_state_dict(summed.state_dict())
    _train_steps(summed, (4, 2, 1), inputs)
    _train_steps(mean, (4, 2, 1), inputs)
    # one half per backward is a power of two: every product and sum rounds alike, so the match is exact
    assert torch.equal(mean.norms["shared"].weight.grad, summed.norms["shared"].weight.grad * 0.5)
    assert torch.equal(mean.norms["shared"].bias.grad, summed.norms["shared"].bias.grad * 0.5)
    # 1 bit has a BN of its own, trained by one bit-width: its gradient is untouched
    assert torch.equal(mean.norms["binary"].weight.grad, summed.norms["binary"].weight.grad)
    assert torch.equal(mean.norms["binary"].bias.grad, summed.norms["binary"].bias.grad)


def test_unknown_gradient_mode_is_refused():
    with pytest.raises(ValueError, match="grad must be one of"):
        SharedBatchNorm2d(2, (2, 4), grad="median")
