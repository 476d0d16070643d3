"""The plugin contract, checked for every registered method (built-in and entry points)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from harness.method import Batch, RunContext
from harness.registry import get_method, list_methods

BITS = (2, 3, 4, 8)  # a set every method supports, one odd bit-width among them


def bits_of(method) -> tuple[int, ...]:
    """The bit-widths a method is built for here: its fixed set (the full-precision reference: 32) or BITS."""
    return tuple(getattr(method, "fixed_bits", None) or BITS)


@pytest.fixture(params=list_methods())
def method_and_model(request, synthetic):
    method = get_method(request.param)()
    torch.manual_seed(0)
    model = method.build("resnet20", synthetic.info.num_classes, bits_of(method), synthetic.info, 0.25)
    return method, model


def test_switching_bits_has_no_hidden_state(method_and_model, synthetic):
    """Output at the lowest bit-width after visiting the highest equals the output computed first, bit for bit."""
    method, model = method_and_model
    low, high = min(bits_of(method)), max(bits_of(method))
    model.eval()
    x = synthetic.test.get_batch(torch.arange(16))
    with torch.no_grad():
        method.set_bits(model, low)
        first = model(x)
        method.set_bits(model, high)
        highest = model(x)
        method.set_bits(model, low)
        method.set_bits(model, low)  # idempotent
        again = model(x)
    assert torch.equal(first, again)
    assert low == high or not torch.equal(first, highest)


def test_train_step_counts_one_pass_per_sample_and_bit_width(method_and_model, synthetic):
    method, model = method_and_model
    model.train()
    indices = torch.arange(8)
    batch = Batch(synthetic.train.get_batch(indices), synthetic.train.labels[indices], indices)
    ctx = RunContext(bits=bits_of(method), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    losses = method.train_step(model, batch, ctx)
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert ctx.passes == Counter({b: 8 for b in bits_of(method)})
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def step_with_and_without(method_and_model, synthetic, switch, runs: list[bool]) -> list[bool]:
    """One training step of a copy of the model with ``switch(True)`` and one with ``switch(False)``: asserts that
    the losses and every gradient are the same bits (signed zeros included); returns, per side, whether any call
    recorded in ``runs`` during it returned a result."""
    import copy

    method, model = method_and_model
    model.train()
    indices = torch.arange(8)
    batch = Batch(synthetic.train.get_batch(indices), synthetic.train.labels[indices], indices)
    results, ran = [], []
    for enabled in (True, False):
        replica = copy.deepcopy(model)
        ctx = RunContext(bits=bits_of(method), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
        torch.manual_seed(0)
        runs.clear()
        with switch(enabled):
            losses = method.train_step(replica, batch, ctx)
        ran.append(any(runs))
        results.append((losses, [p.grad for p in replica.parameters()]))
    (on_losses, on_grads), (off_losses, off_grads) = results
    assert on_losses == off_losses
    for a, b in zip(on_grads, off_grads):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a.view(torch.int32), b.view(torch.int32))
    return ran


def counting(operator, runs: list[bool]):
    """``operator`` recording in ``runs`` whether each call returned a result (None: the caller's fallback ran)."""
    def counted(*args):
        result = operator(*args)
        runs.append(result is not None)
        return result

    return counted


def test_train_step_with_compiled_kernels_gives_the_eager_bits(method_and_model, synthetic, monkeypatch):
    """The compiled quantizer kernels (methods.quant.kernels, forced on from one element) change no bit of a
    training step: the losses and every gradient equal the eager formulas', signed zeros included."""
    import contextlib

    from methods.quant.kernels import CompiledKernel, fused_kernels
    from methods.quant.native import native_kernels

    runs = []
    call = CompiledKernel.__call__
    monkeypatch.setattr(CompiledKernel, "__call__", lambda self, *args: counting(call, runs)(self, *args))

    @contextlib.contextmanager
    def compiled_only(enabled: bool):
        with fused_kernels(enabled, min_elements=1), native_kernels(False):  # PACT would take the native loops first
            yield

    ran = step_with_and_without(method_and_model, synthetic, compiled_only, runs)
    assert ran == [method_and_model[0].name in ("adabits", "mbquant"), False]  # the methods with kernels


def test_train_step_with_native_operators_gives_the_pytorch_bits(method_and_model, synthetic, monkeypatch):
    """The native operators (methods.quant.native) change no bit of a training step: the losses and every gradient
    equal those of the PyTorch formulas, signed zeros included; every quantized method does run them."""
    from methods.quant import kernels, native

    if not native.native_available():
        pytest.skip(f"no native operators: {native._State.failure}")
    runs, weight_runs = [], []
    for name in ("clamp_round_unit", "pact_quantize", "bounded_quantize", "loop"):
        monkeypatch.setattr(native, name, counting(getattr(native, name), runs))
    monkeypatch.setattr(native, "list_loop", counting(native.list_loop, weight_runs))
    for kernel in (kernels.bounded_forward, kernels.bounded_backward):  # the test networks' tensors are small
        monkeypatch.setattr(kernel, "native_min_elements", 1)
    ran = step_with_and_without(method_and_model, synthetic, native.native_kernels, runs)
    name = method_and_model[0].name
    assert ran == [name in ("anyprecision", "dedicated", "emq", "adabits", "mbquant"), False]
    # the weight-list operators: DoReFa's and SAT's weights (the step with them on runs first)
    assert any(weight_runs) == (name in ("anyprecision", "dedicated", "emq", "adabits"))


def test_storage_grows_with_bits_and_total_covers_each(method_and_model):
    method, model = method_and_model
    sizes = [method.storage(model, b) for b in bits_of(method)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert method.storage_total(model, bits_of(method)) >= max(sizes)


def test_config_round_trips_through_json(method_and_model):
    method, _ = method_and_model
    cfg = method.cfg
    assert type(cfg).from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("name", list_methods())
def test_every_methods_training_network_traces_as_one_graph(name):
    """``--compile`` gets one graph per bit-width: a graph break splits it and runs the pieces in between eagerly
    (AdaBits' clipping read its bound back to the host at every activation: 22 breaks in a resnet8)."""
    from harness.data import DatasetInfo

    torch._dynamo.reset()
    method = get_method(name)()
    model = method.build("resnet8", 10, (2, 4, 8), DatasetInfo("trace", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, "none"),
                         0.5)
    model.train()
    explanation = torch._dynamo.explain(model)(torch.rand(4, 3, 8, 8))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons[:1]
