"""The native bias-correction operator (methods/quant/csrc/bias_correction.cpp, through native.list_loop) against the
list path it replaces, bit for bit: EMQ's Eq. 2 with per-layer statistics, w'_q = sqrt(V[w] / V[w_q]) (w_q + E[w] -
E[w_q]), scale 1 where V[w_q] is at most the floor; the batched training path with it on and off; where it declines."""

import pytest
import torch

from methods.quant import native
from methods.quant.bias_correction import MIN_VARIANCE, BiasCorrectedQuantizer, _CorrectedTerms, reference_statistics
from methods.quant.dorefa import dorefa_weight
from methods.quant.native import native_kernels
from methods.quant.weight_batch import batch_terms
from tests.methods.quant.list_loop_answers import recording_list_loop

pytestmark = pytest.mark.skipif(not native.native_available(), reason=f"no native operators: {native._State.failure}")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def list_path(quantized, means, variances, floor: float):
    """bias_correction.py's list operations for per-layer statistics, with the variance floor as an argument."""
    scales, shifts = [], []
    for q, mean_ref, var_ref in zip(quantized, means, variances):
        dims = tuple(range(q.dim()))
        mean_q, var_q = q.mean(dim=dims, keepdim=True), q.var(dim=dims, correction=0, keepdim=True)
        scales.append(torch.where(var_q > floor, torch.sqrt(var_ref / var_q.clamp_min(floor)), torch.ones_like(var_q)))
        shifts.append(mean_ref - mean_q)
    return torch._foreach_mul(scales, torch._foreach_add(quantized, shifts)), scales


def layers() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """DoReFa-quantized weights at 2 and 8 bits and a constant layer (variance 0: scale 1), with their latent
    weights' statistics as the references."""
    torch.manual_seed(0)
    latent = [torch.randn(16, 3, 3, 3) * 0.3, torch.randn(32, 16, 3, 3) * 0.05, torch.randn(64, 32, 3, 3) * 0.02]
    quantized = [dorefa_weight(w, bits).detach() for w in latent for bits in (2, 8)] + [torch.full((4, 4, 1, 1), 0.5)]
    statistics = [reference_statistics(w) for w in latent for _ in (2, 8)] + [reference_statistics(latent[0])]
    return quantized, [m for m, _ in statistics], [v for _, v in statistics]


def test_corrected_weights_and_scales_are_the_list_path_bits():
    quantized, means, variances = layers()
    with torch.no_grad():
        corrected, scales = native.list_loop("bias_correct", quantized, means, variances, MIN_VARIANCE)
    expected, expected_scales = list_path(quantized, means, variances, MIN_VARIANCE)
    assert len(corrected) == len(scales) == len(quantized)
    for a, b in zip([*corrected, *scales], [*expected, *expected_scales]):
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(bits_of(a), bits_of(b))
    assert scales[-1].item() == 1.0  # the constant layer


@pytest.mark.parametrize("offset", [-1.0, -0.25, 0.0, 1.0])
def test_the_variance_floor_is_compared_as_float32(offset):
    """A floor ``offset`` float32 steps from a layer's variance: at or above it the scale is 1, one step below it
    the correction applies, and a quarter step below (not a float32) it is 1 too: the list path compares a float
    tensor with the Python float rounded to float32, and so does the operator."""
    quantized, means, variances = layers()
    variance = quantized[2].var(correction=0)
    step = float(torch.nextafter(variance, torch.tensor(1.0))) - float(variance)
    floor = float(variance) + offset * step
    with torch.no_grad():
        corrected, scales = native.list_loop("bias_correct", quantized, means, variances, floor)
    expected, expected_scales = list_path(quantized, means, variances, floor)
    pairs = zip([*corrected, *scales], [*expected, *expected_scales])
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in pairs)
    assert (scales[2].item() == 1.0) == (offset > -1.0)


def test_scales_over_a_sweep_of_variance_ratios_are_the_list_path_bits():
    """Two thousand layers whose variances span ratios 0.05-20: the scale is ATen's sqrt of the float32 ratio,
    which is not always the correctly rounded root (a scalar std::sqrt differed in 10 of 432 calls of a run)."""
    torch.manual_seed(3)
    quantized = [torch.randn(3, 4) * float(spread) for spread in torch.logspace(-3, 0, 2000)]
    means = [torch.zeros(1, 1) for _ in quantized]
    variances = [torch.rand(1, 1) * 1e-2 + 1e-6 for _ in quantized]
    with torch.no_grad():
        corrected, scales = native.list_loop("bias_correct", quantized, means, variances, MIN_VARIANCE)
    expected, expected_scales = list_path(quantized, means, variances, MIN_VARIANCE)
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(scales, expected_scales))
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(corrected, expected))


def test_declines_what_is_not_finite_or_not_contiguous_and_under_grad():
    quantized, means, variances = layers()
    with torch.no_grad():
        broken = [q.clone() for q in quantized]
        broken[1].view(-1)[3] = float("nan")
        assert native.list_loop("bias_correct", broken, means, variances, MIN_VARIANCE) is None
        infinite = [v.clone() for v in variances]
        infinite[0].fill_(float("inf"))
        assert native.list_loop("bias_correct", quantized, means, infinite, MIN_VARIANCE) is None
        strided = [q.transpose(0, 1) for q in quantized]
        assert native.list_loop("bias_correct", strided, means, variances, MIN_VARIANCE) is None
    assert native.list_loop("bias_correct", quantized, means, variances, MIN_VARIANCE) is None  # grad mode on


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_batched_corrected_terms_give_the_same_bits_with_the_operator_on_and_off(bits):
    """_CorrectedTerms.quantized_many and backward_many, as the weight batch calls them, with the native operators on
    and off: the same corrected weights, scales and latent-weight gradients."""
    torch.manual_seed(bits)
    weights = [torch.randn(16, 8, 3, 3) * 0.1, torch.randn(32, 16, 3, 3) * 0.05]
    grads = [torch.randn_like(w) * 1e-2 for w in weights]
    results = []
    for enabled in (True, False):
        with recording_list_loop() as answered, native_kernels(enabled), torch.no_grad():
            terms = [batch_terms(BiasCorrectedQuantizer(dorefa_weight), w.clone(), bits)[1] for w in weights]
            assert all(isinstance(t, _CorrectedTerms) for t in terms)
            corrected = _CorrectedTerms.quantized_many(terms, bits)
            scales = [t.scale for t in terms]
            back = _CorrectedTerms.backward_many(terms, grads, bits)
        assert ("bias_correct", enabled) in answered  # the operator answered exactly when switched on
        results.append([*corrected, *scales, *back])
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*results))
