"""The native weight-list operators (methods/quant/csrc/weight_lists.cpp and sat_weight_lists.cpp, through
methods.quant.native.list_loop) against the PyTorch list operations they replace, bit for bit: DoReFa's weight
quantizer (Zhou et al. 2016, Eq. 9 in Any-Precision's form: E (2 round(L (tanh(w) / 2 max|tanh(w)| + 1/2)) / L - 1))
and SAT's (AdaBits: 2 min(floor(2^b (w~ + 1) / 2), 2^b - 1) / 2^b - 1, w~ = tanh(w) / max|tanh(w)|), their
bit-width-independent terms, forward values and gradients, on weights with ties at the max, signed zeros, NaN,
infinities and an all-zero layer."""

import pytest
import torch

from methods.quant import native
from methods.quant.dorefa import _DoReFaTerms
from methods.quant.native import native_kernels
from methods.quant.sat import _SATTerms
from tests.methods.quant.list_loop_answers import recording_list_loop

pytestmark = pytest.mark.skipif(not native.native_available(), reason=f"no native operators: {native._State.failure}")

BITS = [*range(1, 9), 32]
TERM_NAMES = {_DoReFaTerms: ("scale", "normalized", "max_abs"), _SATTerms: ("squashed", "max_abs", "normalized")}
LAZY_NAMES = {_DoReFaTerms: ("twice_max", "unit", "max_factor", "ties", "sign"),
              _SATTerms: ("unit", "max_factor", "ties", "sign")}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else t.dtype)


def layer_weights() -> list[torch.Tensor]:
    """Convolution weights as a ResNet's, a layer with several elements at the max (of both signs) and one with signed
    zeros and subnormals: finite values, which the native operators take."""
    torch.manual_seed(0)
    plain = [torch.randn(16, 3, 3, 3) * 0.3, torch.randn(32, 16, 3, 3) * 0.05, torch.randn(64, 64, 3, 3) * 0.02]
    ties = torch.randn(8, 8, 3, 3) * 0.1
    ties.view(-1)[[0, 5, 9]] = torch.tensor([0.9, -0.9, 0.9])
    zeros = torch.randn(8, 4, 3, 3) * 0.1
    zeros.view(-1)[:6] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1e-45, -1e-45])
    return [*plain, ties, zeros, torch.tensor([[[[0.25]]]])]


def unusual_weights() -> list[torch.Tensor]:
    """A +-inf weight (tanh gives +-1, ties at the max, and mean|w| is inf), a NaN weight (the max is NaN) and an
    all-zero layer (M = 0: the divisions give NaN and inf)."""
    infinite = torch.randn(4, 4, 3, 3)
    infinite.view(-1)[[3, 7]] = torch.tensor([float("inf"), -float("inf")])
    nan = torch.randn(4, 4, 1, 1)
    nan.view(-1)[2] = float("nan")
    return [infinite, nan, torch.zeros(4, 4, 3, 3)]


def upstream_gradients(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = [torch.randn_like(w) * 1e-2 for w in weights]
    grads[1].view(-1)[:4] = torch.tensor([-0.0, 0.0, 1e-45, -1e-45])
    return grads


def quantize_and_backward(terms_class, weights, grads, bits: int, args: tuple, *, enabled: bool):
    """Terms, forward values and gradients of every layer through the list path, with the native operators on or off,
    recording which list operators answered."""
    with recording_list_loop() as answered, native_kernels(enabled), torch.no_grad():
        terms = [terms_class(w) for w in weights]
        quantized = terms_class.quantized_many(terms, bits, *args)
        gradients = terms_class.backward_many(terms, grads, bits, *args)
    return terms, quantized, gradients, answered


def assert_same_bits(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert torch.equal(bits_of(a), bits_of(b))


def assert_same_terms(terms_class, native_terms, eager_terms) -> None:
    for ours, theirs in zip(native_terms, eager_terms):
        assert_same_bits([getattr(ours, name) for name in TERM_NAMES[terms_class]],
                         [getattr(theirs, name) for name in TERM_NAMES[terms_class]])
        for name in LAZY_NAMES[terms_class]:  # what the eager path computed when first needed, the native one at once
            if name in ours._lazy and name in theirs._lazy:
                ours_value, theirs_value = ours._lazy[name], theirs._lazy[name]
                assert_same_bits(list(ours_value) if name == "ties" else [ours_value],
                                 list(theirs_value) if name == "ties" else [theirs_value])


CASES = [(_DoReFaTerms, ()), (_SATTerms, ("original",)), (_SATTerms, ("centered",))]


def native_operators(terms_class, bits: int) -> set[str]:
    """The operators of the list path (the 32-bit forward and backward heads stay list operations)."""
    prefix = "dorefa" if terms_class is _DoReFaTerms else "sat"
    names = {f"{prefix}_weight_terms", "tanh_max_backward"}
    return names | ({f"{prefix}_weight_forward", f"{prefix}_weight_backward"} if bits < 32 else set())


def assert_same_results(terms_class, args, weights, grads, bits) -> list[tuple[str, bool]]:
    """Native on and off give the same terms, values and gradients; returns which operators answered when on."""
    native_run = quantize_and_backward(terms_class, weights, grads, bits, args, enabled=True)
    eager_run = quantize_and_backward(terms_class, weights, grads, bits, args, enabled=False)
    assert_same_terms(terms_class, native_run[0], eager_run[0])
    assert_same_bits(native_run[1], eager_run[1])
    assert_same_bits(native_run[2], eager_run[2])
    assert not any(ran for _, ran in eager_run[3])
    return native_run[3]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("terms_class", "args"), CASES, ids=["dorefa", "sat", "sat-centered"])
def test_terms_values_and_gradients_equal_the_list_operations(terms_class, args, bits):
    weights = layer_weights()
    answered = assert_same_results(terms_class, args, weights, upstream_gradients(weights), bits)
    assert {name for name, ran in answered if ran} == native_operators(terms_class, bits)
    assert all(ran for _, ran in answered)
    with native_kernels(True), torch.no_grad():  # the native call fills every term the list path reads later
        assert all(set(LAZY_NAMES[terms_class]) <= set(terms_class(w)._lazy) for w in weights)


@pytest.mark.parametrize("bits", [1, 2, 8, 32])
@pytest.mark.parametrize(("terms_class", "args"), CASES, ids=["dorefa", "sat", "sat-centered"])
def test_values_that_are_not_finite_take_the_list_operations(terms_class, args, bits):
    """A layer whose weight or max is not finite, or an upstream gradient that is not, is declined by the operators,
    whatever else is in the list, and the list operations give their own bits (NaN payloads included)."""
    finite = layer_weights()
    for unusual in unusual_weights():
        weights = [*finite, unusual]
        answered = assert_same_results(terms_class, args, weights, upstream_gradients(weights), bits)
        # SAT's terms of an infinite weight are finite (tanh gives +-1, and SAT has no mean|w|)
        declined = not (terms_class is _SATTerms and bool(unusual.isinf().any()))
        terms_answers = [ran for name, ran in answered if name.endswith("_terms")]
        assert terms_answers == [True] * len(finite) + [not declined]  # the other layers' terms are still native
        if bits < 32 and declined:
            assert not any(ran for name, ran in answered if name.endswith("_forward"))
    grads = upstream_gradients(finite)
    grads[2].view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    answered = assert_same_results(terms_class, args, finite, grads, bits)
    assert not any(ran for name, ran in answered if name.endswith("_backward"))


def test_a_gradient_in_another_layout_takes_the_list_operations():
    """A transposed upstream gradient would make the eager products, and so the sums over them, run in its layout:
    the operators decline it and the list operations give what they always gave."""
    weights = layer_weights()[:3]
    grads = [torch.randn(w.shape[::-1]).permute(3, 2, 1, 0) for w in weights]
    native_run = quantize_and_backward(_DoReFaTerms, weights, grads, 2, (), enabled=True)
    eager_run = quantize_and_backward(_DoReFaTerms, weights, grads, 2, (), enabled=False)
    assert_same_bits(native_run[2], eager_run[2])
    assert ("dorefa_weight_backward", False) in native_run[3]


def test_nothing_native_runs_while_a_graph_is_recorded_or_on_other_dtypes():
    weight = torch.randn(8, 8, 3, 3)
    assert native.list_loop("dorefa_weight_terms", weight) is None  # grad mode on: a double backward records
    with torch.no_grad():
        assert native.list_loop("dorefa_weight_terms", weight) is not None
        assert native.list_loop("dorefa_weight_terms", weight.double()) is None
        assert native.list_loop("sat_weight_terms", weight.to(memory_format=torch.channels_last)) is None
        double_scale = [torch.tensor(1.0, dtype=torch.float64)]
        assert native.list_loop("dorefa_weight_forward", [weight], double_scale, 3.0) is None
        with native_kernels(False):
            assert native.list_loop("dorefa_weight_terms", weight) is None


@pytest.mark.parametrize("scheme", ["original", "centered"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_sat_codes_at_every_grid_point_and_its_neighbours(bits, scheme):
    """SAT's floor (taken through rint in the native loop) at every ``j / 2^b``, its float neighbours and the half
    steps, at 0, -0.0, 1 and just outside [0, 1]: the list operations' bits."""
    steps = 2**bits
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    points = torch.cat((grid, grid + 0.5 / steps, torch.tensor([-0.0, -1e-45, 1e-45, -0.3, 1.3]))).float()
    units = torch.cat((points, torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-1.0))))
    results = []
    for enabled in (True, False):
        terms = _SATTerms.__new__(_SATTerms)
        terms._lazy = {"unit": units}
        with native_kernels(enabled), torch.no_grad():
            results.append(_SATTerms.quantized_many([terms], bits, scheme)[0])
    assert_same_bits([results[0]], [results[1]])
