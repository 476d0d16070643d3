// DoReFa's weight quantizer (Zhou et al., arXiv 1606.06160, Eq. 9, in Any-Precision's form) over a list of layers,
// for methods/quant/dorefa.py's batched node: a training step quantizes every layer's weight at every bit-width,
// and eager PyTorch makes six elementwise calls per layer forward and about a dozen backward, on tensors of a few
// thousand elements where each call's fixed cost outweighs its arithmetic. Each operator here makes one call for
// all the layers and one loop per layer, and the terms that do not depend on the bit-width (computed once per step,
// at the first bit-width) come from one call per layer instead of about fourteen.
//   dorefa_weight_terms     E = mean|w|, t = tanh(w), M = max|t|, 2M, u, f, [|t| = M], its count, sgn(t)
//   dorefa_weight_forward   E (2 round(u L) / L - 1)                      with u = t / 2M + 1/2 (cached, per layer)
//   dorefa_weight_backward  g_t = (2 E g) / 2M and the sum of -(2 E g) * f, times 2    (f = (t / 2M) / 2M, cached)
// and the tail it shares with SAT's weights (sat_weight_lists.cpp): the gradient through the max, shared among
// ties, and tanh:
//   tanh_max_backward       tanh_backward(g_t + [|t| = M] (g_M / ties) sgn(t), t)
// Same bits as the list operations they replace: each element goes through the same IEEE operations in their order
// (built with -ffp-contract=off, without -ffast-math); the sums (the mean's and the max's gradient's) are ATen's own
// over a tensor of the same layout, and tanh and its derivative are ATen's kernels, so none depends on how this file
// is compiled; a max is exact in any order. What declines an input: weight_lists.h.
#include <torch/library.h>

#include "weight_lists.h"

namespace {

// The loops return whether every value they read was finite (weight_lists.h).
MBQ_TARGET_CLONES bool dorefa_forward_loop(const float* unit, float* out, int64_t count, float levels, float scale) {
  uint32_t special = 0;
  for (int64_t i = 0; i < count; ++i) {
    special |= not_finite(unit[i]);
    out[i] = ((std::rint(unit[i] * levels) / levels) * 2.0f - 1.0f) * scale;
  }
  return special == 0;
}

MBQ_TARGET_CLONES bool dorefa_backward_loop(const float* grad, const float* factor, float* grad_normalized,
                                            float* to_max, int64_t count, float scale, float twice_max) {
  uint32_t special = 0;
  for (int64_t i = 0; i < count; ++i) {
    special |= not_finite(grad[i]) | not_finite(factor[i]);
    const float grad_unit = (grad[i] * scale) * 2.0f;
    grad_normalized[i] = grad_unit / twice_max;
    to_max[i] = (-grad_unit) * factor[i];
  }
  return special == 0;
}

// `selected ? value : +0.0f` as bit operations, which vectorize next to the float arithmetic (a select on a bool
// loaded from memory does not)
inline float select_or_zero(uint8_t selected, uint32_t value_bits) {
  const uint32_t bits = value_bits & (0u - static_cast<uint32_t>(selected));
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

MBQ_TARGET_CLONES bool shared_max_loop(const float* grad_normalized, const uint8_t* at_max, const float* sign,
                                       const float* t, float* out, int64_t count, float per_tie) {
  uint32_t special = 0, per_tie_bits;
  std::memcpy(&per_tie_bits, &per_tie, sizeof per_tie_bits);
  for (int64_t i = 0; i < count; ++i) {
    special |= not_finite(grad_normalized[i]) | not_finite(sign[i]) | not_finite(t[i]);
    out[i] = grad_normalized[i] + select_or_zero(at_max[i], per_tie_bits) * sign[i];
  }
  return special == 0;
}

// u = t / D + 1/2, f = (t / D) / D and sgn(t)
MBQ_TARGET_CLONES void dorefa_terms_loop(const float* t, float* unit, float* factor, float* sign, int64_t count,
                                         float twice_max) {
  for (int64_t i = 0; i < count; ++i) {
    const float over = t[i] / twice_max;
    unit[i] = over + 0.5f;
    factor[i] = over / twice_max;
    sign[i] = sign_of(t[i]);
  }
}

// DoReFa's bit-width-independent terms of one weight: E = mean|w| by ATen (its summation order), t = tanh(w),
// M = max|t|, D = 2M, and in one pass u, f and sgn(t); then the elements at the max and their count
std::vector<Tensor> dorefa_weight_terms(const Tensor& weight) {
  auto [normalized, max_abs] = tanh_and_max(weight);
  if (!normalized.defined()) {
    return {};
  }
  auto scale = at::mean(at::abs(weight));
  if (!std::isfinite(value_of<float>(scale))) {
    return {};
  }
  const float twice_max = 2.0f * max_abs;
  auto unit = at::empty_like(normalized), factor = at::empty_like(normalized), sign = at::empty_like(normalized);
  dorefa_terms_loop(normalized.const_data_ptr<float>(), unit.mutable_data_ptr<float>(),
                    factor.mutable_data_ptr<float>(), sign.mutable_data_ptr<float>(), normalized.numel(), twice_max);
  auto [at_max, ties] = ties_of(normalized, max_abs);
  return {scale, normalized, float_scalar(max_abs, normalized), float_scalar(twice_max, normalized),
          unit,  factor,     at_max,                           ties,
          sign};
}

TensorList dorefa_weight_forward(const TensorList& units, const TensorList& scales, double levels) {
  if (!all_contiguous_cpu(units, at::kFloat) || !one_each(scales, units.size(), at::kFloat)) {
    return {};
  }
  return per_layer(units, [&](size_t i, Tensor& out) {
    const float scale = value_of<float>(scales[i]);
    return std::isfinite(scale) && dorefa_forward_loop(units[i].const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                                       out.numel(), static_cast<float>(levels), scale);
  });
}

std::tuple<TensorList, TensorList> dorefa_weight_backward(const TensorList& grads, const TensorList& scales,
                                                          const TensorList& twice_max, const TensorList& factors) {
  const auto layers = grads.size();
  if (!all_contiguous_cpu(grads, at::kFloat) || !all_contiguous_cpu(factors, at::kFloat) ||
      !same_sizes(factors, grads) || !one_each(scales, layers, at::kFloat) ||
      !one_each(twice_max, layers, at::kFloat)) {
    return {};
  }
  auto [heads, sums] = backward_heads(grads, [&](size_t i, Tensor& head, Tensor& to_max) {
    const float scale = value_of<float>(scales[i]), denominator = value_of<float>(twice_max[i]);
    return std::isfinite(scale) && usable_max(denominator) &&
           dorefa_backward_loop(grads[i].const_data_ptr<float>(), factors[i].const_data_ptr<float>(),
                                head.mutable_data_ptr<float>(), to_max.mutable_data_ptr<float>(), grads[i].numel(),
                                scale, denominator);
  });
  for (auto& sum : sums) {
    sum.mul_(2);  // the list path's product by 2 after the sum
  }
  return {heads, sums};
}

TensorList tanh_max_backward(const TensorList& grad_normalized, const TensorList& grad_max, const TensorList& at_max,
                             const TensorList& ties, const TensorList& signs, const TensorList& tanh_w) {
  const auto layers = grad_normalized.size();
  if (!all_contiguous_cpu(grad_normalized, at::kFloat) || !all_contiguous_cpu(tanh_w, at::kFloat) ||
      !all_contiguous_cpu(signs, at::kFloat) || !all_contiguous_cpu(at_max, at::kBool) ||
      !same_sizes(tanh_w, grad_normalized) || !same_sizes(signs, grad_normalized) ||
      !same_sizes(at_max, grad_normalized) || !one_each(grad_max, layers, at::kFloat) ||
      !one_each(ties, layers, at::kLong)) {
    return {};
  }
  return per_layer(grad_normalized, [&](size_t i, Tensor& out) {
    // the max's gradient shared among its ties: a float32 division, as ATen divides a float by an integer tensor
    const float per_tie = value_of<float>(grad_max[i]) / static_cast<float>(value_of<int64_t>(ties[i]));
    if (!std::isfinite(per_tie) ||
        !shared_max_loop(grad_normalized[i].const_data_ptr<float>(),
                         reinterpret_cast<const uint8_t*>(at_max[i].const_data_ptr<bool>()),
                         signs[i].const_data_ptr<float>(), tanh_w[i].const_data_ptr<float>(),
                         out.mutable_data_ptr<float>(), out.numel(), per_tie)) {
      return false;
    }
    at::tanh_backward_out(out, out, tanh_w[i]);  // autograd's own kernel for tanh's derivative, in place
    return true;
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  m.def("dorefa_weight_terms(Tensor weight) -> Tensor[]");
  m.def("dorefa_weight_forward(Tensor[] units, Tensor[] scales, float levels) -> Tensor[]");
  m.def("dorefa_weight_backward(Tensor[] grads, Tensor[] scales, Tensor[] twice_max, Tensor[] factors) -> "
        "(Tensor[], Tensor[])");
  m.def("tanh_max_backward(Tensor[] grad_normalized, Tensor[] grad_max, Tensor[] at_max, Tensor[] ties, "
        "Tensor[] signs, Tensor[] tanh_w) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CompositeExplicitAutograd, m) {
  m.impl("dorefa_weight_terms", &dorefa_weight_terms);
  m.impl("dorefa_weight_forward", &dorefa_weight_forward);
  m.impl("dorefa_weight_backward", &dorefa_weight_backward);
  m.impl("tanh_max_backward", &tanh_max_backward);
}
