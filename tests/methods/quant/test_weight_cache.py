"""Quantized weights are computed once per evaluation and recomputed after the weights change."""

from __future__ import annotations

import pytest
import torch

from harness.method import Batch, RunContext
from harness.registry import get_method, list_methods
from methods.quant.dorefa import dorefa_weight
from methods.quant.modules import QuantConv2d
from methods.quant.weight_cache import clear_weight_caches, weight_cache_disabled

BITS = (2, 3, 4, 8)


def counting_conv() -> tuple[QuantConv2d, list[int]]:
    calls: list[int] = []

    def quantizer(weight: torch.Tensor, bits: int) -> torch.Tensor:
        calls.append(bits)
        return dorefa_weight(weight, bits)

    torch.manual_seed(0)
    return QuantConv2d(3, 4, 3, padding=1, weight_quantizer=quantizer, bits=4), calls


def test_one_evaluation_quantizes_once_per_bit_width_and_training_every_pass():
    conv, calls = counting_conv()
    x = torch.randn(2, 3, 5, 5)
    conv.eval()
    with torch.no_grad():
        outputs = [conv(x) for _ in range(3)]
        conv.set_bits(2)
        conv(x), conv(x)
    assert calls == [4, 2]
    assert all(torch.equal(outputs[0], out) for out in outputs)
    conv.train()
    conv(x).sum().backward()
    conv(x)
    assert calls == [4, 2, 2, 2]  # training never reads the cache
    conv.eval()
    with torch.no_grad():
        conv(x)
    assert calls == [4, 2, 2, 2]  # the weights did not change: the cached 2-bit weight is still valid


def test_a_weight_update_after_an_evaluation_invalidates_the_cache():
    conv, calls = counting_conv()
    x = torch.randn(2, 3, 5, 5)
    conv.eval()
    with torch.no_grad():
        before = conv(x)
    conv.train()
    conv(x).square().sum().backward()
    torch.optim.SGD(conv.parameters(), lr=0.5).step()
    conv.eval()
    with torch.no_grad():
        after = conv(x)
        with weight_cache_disabled():
            reference = conv(x)
    assert calls == [4, 4, 4, 4]  # eval, train, eval after the step (recomputed), the uncached reference
    assert not torch.equal(before, after) and torch.equal(after, reference)
    with torch.no_grad():
        conv.weight.mul_(2)  # any in-place change bumps the version
        assert torch.equal(conv(x), conv._conv_forward(x, dorefa_weight(conv.weight, 4), None))
    clear_weight_caches(conv)
    assert "_eval_weight_cache" not in conv.__dict__


def bits_of(method) -> tuple[int, ...]:
    return tuple(getattr(method, "fixed_bits", None) or BITS)


@pytest.mark.parametrize("name", list_methods())
def test_cached_evaluation_equals_the_uncached_one_before_and_after_a_train_step(name, synthetic):
    method = get_method(name)()
    torch.manual_seed(0)
    model = method.build("resnet8", synthetic.info.num_classes, bits_of(method), synthetic.info, 0.25)
    x = synthetic.test.get_batch(torch.arange(16))
    indices = torch.arange(16)
    batch = Batch(synthetic.train.get_batch(indices), synthetic.train.labels[indices], indices)
    ctx = RunContext(bits=bits_of(method), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def logits() -> list[torch.Tensor]:
        model.eval()
        out = []
        with torch.no_grad():
            for bits in bits_of(method):
                method.set_bits(model, bits)
                out.append(model(x))
                out.append(model(x))  # from the cache
        return out

    for _ in range(2):  # before and after a train step
        cached = logits()
        with weight_cache_disabled():
            reference = logits()
        assert all(torch.equal(a, b) for a, b in zip(cached, reference, strict=True))
        model.train()
        optimizer.zero_grad()
        method.train_step(model, batch, ctx)
        optimizer.step()
    if name != "fp":
        assert any("_eval_weight_cache" in m.__dict__ for m in model.modules())
