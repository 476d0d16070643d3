"""Values cached per version of a tensor: computed once, recomputed after an in-place update, gone with the tensor;
and the quantizers that use the cache give the uncached results bit for bit over a multi-bit step."""

import contextlib
import copy
import gc
import weakref
from functools import partial

import pytest
import torch
from torch import nn

from harness import distributed
from harness.optim import step_optimizers
from harness.registry import get_method, list_methods
from methods.quant.bias_correction import BiasCorrectedQuantizer
from methods.quant.dorefa import dorefa_weight
from methods.quant.sat import sat_weight
from methods.quant.statsq import statsq_weight
from methods.quant.version_cache import cached_entries, derived, version_cache_disabled


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_value_is_computed_once_per_version_and_again_after_an_in_place_update():
    weight = nn.Parameter(torch.ones(3))
    compute, calls = counting(7)
    assert [derived(weight, "seven", compute) for _ in range(3)] == [7, 7, 7]
    assert len(calls) == 1
    assert cached_entries(weight) == ("seven",)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = torch.ones(3)
    optimizer.step()  # in place: bumps the version
    assert cached_entries(weight) == ()
    derived(weight, "seven", compute)
    assert len(calls) == 2


def test_names_are_separate_and_tensors_are_separate():
    a, b = torch.zeros(2), torch.zeros(2)
    assert derived(a, "x", lambda: 1) == 1
    assert derived(a, ("y", dorefa_weight), lambda: 2) == 2
    assert derived(b, "x", lambda: 3) == 3
    assert derived(a, "x", lambda: 4) == 1
    assert set(cached_entries(a)) == {"x", ("y", dorefa_weight)}


def test_entries_go_with_their_tensor():
    tensor = torch.zeros(4)
    value = weakref.ref(derived(tensor, "x", lambda: torch.ones(4)))
    assert value() is not None  # held by the cache
    del tensor
    gc.collect()
    assert value() is None


def test_disabled_cache_and_inference_tensors_recompute_every_time():
    weight = torch.zeros(2)
    compute, calls = counting(1)
    with version_cache_disabled():
        derived(weight, "x", compute)
        derived(weight, "x", compute)
    with torch.inference_mode():
        inference = torch.zeros(2)
    derived(inference, "x", compute)
    derived(inference, "x", compute)
    assert len(calls) == 4
    assert cached_entries(weight) == ()


def test_the_cache_is_not_part_of_state_or_copies():
    layer = nn.Linear(3, 2)
    derived(layer.weight, "x", lambda: torch.ones(100))
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert not layer.weight.__dict__
    twin = copy.deepcopy(layer)
    assert cached_entries(twin.weight) == ()
    assert derived(twin.weight, "x", lambda: 5) == 5


def test_new_storage_is_a_miss_even_at_a_reused_address():
    weight = nn.Parameter(torch.randn(64, 64, 3, 3))
    for _ in range(20):
        derived(weight, "x", lambda: weight.detach().clone())
        weight.data = torch.randn(64, 64, 3, 3)  # set_data: same version counter, new storage
        assert cached_entries(weight) == ()
        assert torch.equal(derived(weight, "x", lambda: weight.detach().clone()), weight.detach())


def test_inference_mode_and_functorch_wrappers_bypass_the_cache():
    weight = nn.Parameter(torch.randn(4, 3))
    with torch.inference_mode():
        dorefa_weight(weight, 2)
    assert cached_entries(weight) == ()
    # torch.func's wrapped tensors have no data pointer: the uncached node runs and says what it needs
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda w: dorefa_weight(w, 2).sum())(weight.detach())


@pytest.mark.parametrize("optimizer_kind", ["sgd-fused", "adam-fused", "sgd-foreach"])
def test_step_optimizers_bumps_versions_even_for_fused_kernels(optimizer_kind):
    name, implementation = optimizer_kind.split("-")
    weight = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
    optimizer_class = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    optimizer = optimizer_class([weight], lr=0.5, **{implementation: True})
    dorefa_weight(weight, 2).sum().backward()
    step_optimizers([optimizer])
    with version_cache_disabled():
        fresh = dorefa_weight(weight, 2)
    assert torch.equal(dorefa_weight(weight, 2), fresh)


def test_broadcast_model_bumps_versions_so_cached_values_are_recomputed(monkeypatch):
    model = nn.Linear(3, 2)
    weight = model.weight
    stale = dorefa_weight(weight, 2).detach()
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    # rank 0's weights arrive through .data, which leaves the version counter alone
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: tensor.mul_(-3.0))
    distributed.broadcast_model(model)
    fresh = dorefa_weight(weight, 2)
    with version_cache_disabled():
        assert torch.equal(fresh, dorefa_weight(weight, 2))
    assert not torch.equal(fresh, stale)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns: signed zeros and NaNs count, unlike ``torch.equal``."""
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


def multi_bit_step(quantizer, weight: torch.Tensor, bits_list, upstream) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each bit-width's forward and backward on the same weights, as a multi-bit training step runs them."""
    outputs = []
    for bits, grad in zip(bits_list, upstream):
        out = quantizer(weight, bits)
        out.backward(grad)
        outputs.append(out.detach())
    return outputs, weight.grad


QUANTIZERS = {
    "dorefa": dorefa_weight,
    "dorefa+bias_correction": BiasCorrectedQuantizer(dorefa_weight),
    "dorefa+bias_correction per channel": BiasCorrectedQuantizer(dorefa_weight, "per_channel"),
    "statsq+bias_correction": BiasCorrectedQuantizer(statsq_weight),
    "sat": sat_weight,
    "sat centered": partial(sat_weight, scheme="centered"),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits_list", [(8, 4, 2), (32, 8, 4, 2, 1), (1, 3, 5, 6, 7)])
def test_cached_quantizers_equal_the_uncached_ones_bit_for_bit_over_steps(name, bits_list):
    quantizer = QUANTIZERS[name]
    torch.manual_seed(len(bits_list))
    initial = torch.randn(16, 8, 3, 3) * 0.2
    flat = initial.view(-1)
    flat[1] = -flat.abs().max()  # a tie at the max
    flat[0] = -flat[1]
    results = []
    for cached in (True, False):
        torch.manual_seed(0)
        weight = nn.Parameter(initial.clone())
        optimizer = torch.optim.SGD([weight], lr=0.5)
        steps = []
        for _ in range(2):  # the second step runs on updated weights: the cache must follow them
            upstream = [torch.randn_like(initial) for _ in bits_list]
            optimizer.zero_grad()
            if cached:
                steps.append(multi_bit_step(quantizer, weight, bits_list, upstream))
            else:
                with version_cache_disabled():
                    steps.append(multi_bit_step(quantizer, weight, bits_list, upstream))
            steps[-1] = (steps[-1][0], steps[-1][1].clone())
            optimizer.step()
        results.append(steps)
    for (cached_outs, cached_grad), (plain_outs, plain_grad) in zip(*results):
        for cached_out, plain_out in zip(cached_outs, plain_outs):
            assert same_bits(cached_out, plain_out)
        assert same_bits(cached_grad, plain_grad)


@pytest.mark.parametrize("quantizer", [dorefa_weight, sat_weight], ids=["dorefa", "sat"])
@pytest.mark.parametrize("upstream_kind", ["negative zeros", "one infinite element"])
@pytest.mark.parametrize("bits", [2, 32])
def test_cached_gradient_keeps_signed_zeros_and_non_finite_values_where_they_were(upstream_kind, bits, quantizer):
    initial = torch.randn(16, 8, 3, 3) * 0.2
    if upstream_kind == "negative zeros":
        upstream = torch.full_like(initial, -0.0)
    else:
        upstream = torch.randn_like(initial)
        upstream.view(-1)[7] = float("inf")
    grads = []
    for cached in (True, False):
        weight = nn.Parameter(initial.clone())
        with contextlib.nullcontext() if cached else version_cache_disabled():
            quantizer(weight, bits).backward(upstream)
        grads.append(weight.grad)
    assert same_bits(*grads)
    if upstream_kind == "one infinite element":
        assert 0 < (~grads[0].isfinite()).sum() < 4  # the element itself and the max, not the whole tensor


def test_dorefa_terms_are_computed_once_for_every_bit_width_of_a_step():
    weight = nn.Parameter(torch.randn(8, 4, 3, 3))
    first = dorefa_weight(weight, 8)
    terms = weight_terms(weight)
    for bits in (4, 2, 32):
        dorefa_weight(weight, bits).sum().backward()
        assert weight_terms(weight) is terms
    first.sum().backward()
    with torch.no_grad():
        weight.add_(1.0)
    dorefa_weight(weight, 8)
    assert weight_terms(weight) is not terms


def weight_terms(weight: torch.Tensor):
    return derived(weight, "dorefa_weight", lambda: pytest.fail("the terms were not cached"))


def test_bias_correction_keys_its_reference_by_quantizer_and_granularity():
    weight = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.2)
    per_layer, per_channel = BiasCorrectedQuantizer(dorefa_weight), BiasCorrectedQuantizer(dorefa_weight, "per_channel")
    first = per_layer(weight, 2).detach()
    second = per_channel(weight, 2).detach()
    with version_cache_disabled():
        assert same_bits(first, per_layer(weight, 2).detach())
        assert same_bits(second, per_channel(weight, 2).detach())
    keys = [key for key in cached_entries(weight) if isinstance(key, tuple)]
    assert len(keys) == 2


def two_step_setup(name: str, bits: tuple[int, ...]):
    """A method, its resnet8 at 8x8 (width 0.5) in training mode, two batches and the run context."""
    from harness.data import DatasetInfo
    from harness.method import Batch, RunContext

    info = DatasetInfo("cache", 10, 1, 8, (0.5,), (0.25,), "none")
    torch.manual_seed(0)
    method = get_method(name)()
    initial = method.build("resnet8", 10, bits, info, 0.5)
    initial.train()
    batches = [Batch(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.arange(16)) for _ in range(2)]
    return method, initial, batches, RunContext(bits=bits, device=torch.device("cpu"), num_classes=10, seed=0,
                                                epochs=1)


def train_two_steps(method, model: nn.Module, batches, ctx) -> dict[str, torch.Tensor]:
    """Two optimizer steps (the second on the first's update); the state dict after them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
        optimizer.zero_grad()
        method.train_step(model, batch, ctx)
        step_optimizers([optimizer])
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_states(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    for key, value in first.items():
        assert same_bits(value, second[key]) if value.is_floating_point() else torch.equal(value, second[key]), key


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_bit_for_bit_the_same_with_the_cache_on_and_off(name):
    method, initial, batches, ctx = two_step_setup(name, (2, 4, 8))
    runs = []
    for cached in (True, False):
        with contextlib.nullcontext() if cached else version_cache_disabled():
            runs.append(train_two_steps(method, copy.deepcopy(initial), batches, ctx))
    assert_same_states(*runs)
