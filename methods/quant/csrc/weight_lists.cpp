// DoReFa's weight quantizer (Zhou et al., arXiv 1606.06160, Eq. 9, in Any-Precision's form) over a list of layers,
// for methods/quant/dorefa.py's batched node: a training step quantizes every layer's weight at every bit-width,
// and eager PyTorch makes six elementwise calls per layer forward and about a dozen backward, on tensors of a few
// thousand elements where each call's fixed cost outweighs its arithmetic. Each operator here makes one call for
// all the layers and one loop per layer, and the terms that do not depend on the bit-width (computed once per step,
// at the first bit-width) come from one call per layer instead of about fourteen.
//   dorefa_weight_terms     E = mean|w|, t = tanh(w), M = max|t|, 2M, u, f, [|t| = M], its count, sgn(t)
//   dorefa_weight_forward   E (2 round(u L) / L - 1)                      with u = t / 2M + 1/2 (cached, per layer)
//   dorefa_weight_backward  g_t = (2 E g) / 2M and the sum of -(2 E g) * f, times 2    (f = (t / 2M) / 2M, cached)
// SAT's weight quantizer (AdaBits' weights, methods/quant/sat.py) likewise, with s = tanh(w), M = max|s|:
//   sat_weight_terms        s, M, w~ = s / M, u, (s / M) / M, [|s| = M], its count, sgn(s)
//   sat_weight_forward      2 (min(floor(u 2^b), 2^b - 1) [+ 1/2]) / 2^b - 1          with u = (s / M + 1) / 2
//   sat_weight_backward     g_s = g~ / M and the sum of -g~ * (s / M) / M,   g~ = (((2 g) / 2^b) 2^b) / 2
// and the tail both share (the gradient through the max, shared among ties, and tanh):
//   tanh_max_backward       tanh_backward(g_t + [|t| = M] (g_M / ties) sgn(t), t)
// Same bits as the list operations they replace: each element goes through the same IEEE operations in their order
// (built with -ffp-contract=off, without -ffast-math); the sums (the mean's and the max's gradient's) are ATen's own
// over a tensor of the same layout, and tanh and its derivative are ATen's kernels, so none depends on how this file
// is compiled; a max is exact in any order.
// Each operator answers an empty list where an input is not a contiguous float32 CPU tensor, so a layout that would
// change the sums' order never reaches a loop, and where a value it reads is not finite (below); the caller's list
// operations then run.
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "native_loops.h"

namespace {

using at::Tensor;
using TensorList = std::vector<Tensor>;

bool contiguous_cpu(const Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type && t.device().is_cpu() && t.is_contiguous();
}

bool all_contiguous_cpu(const TensorList& tensors, at::ScalarType type) {
  for (const auto& t : tensors) {
    if (!contiguous_cpu(t, type)) {
      return false;
    }
  }
  return true;
}

bool one_each(const TensorList& tensors, size_t layers, at::ScalarType type) {
  if (tensors.size() != layers || !all_contiguous_cpu(tensors, type)) {
    return false;
  }
  for (const auto& t : tensors) {
    if (t.numel() != 1) {
      return false;
    }
  }
  return true;
}

bool same_sizes(const TensorList& tensors, const TensorList& like) {
  if (tensors.size() != like.size()) {
    return false;
  }
  for (size_t i = 0; i < like.size(); ++i) {
    if (tensors[i].sizes() != like[i].sizes()) {
      return false;
    }
  }
  return true;
}

// 1 where a float is an infinity or a NaN (its exponent all ones), else 0: an integer test, so that the loops that
// OR it over their inputs still vectorize (a bool reduction of std::isfinite does not)
inline uint32_t not_finite(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
}

// a one-element CPU tensor's value, read in place (checked by one_each; no dispatch, no host read on a device)
template <typename T>
T value_of(const Tensor& t) {
  return *t.const_data_ptr<T>();
}

// The loops return whether every value they read was finite: where one was not, the caller answers an empty list and
// the list operations run (a NaN read from memory has a payload, and which of two NaNs an operation passes on is the
// compiler's choice of operand order; NaNs the arithmetic makes from finite values all have the default payload).
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

// floor(v) for a finite v, through rint, which GCC vectorizes where it does not vectorize floor (without
// -fno-trapping-math): the nearest integer, less one where that lies above v; exact, -0.0 kept (the value is
// discarded where v is not finite: the loop declines it)
inline float floor_finite(float value) {
  const float nearest = std::rint(value);
  return nearest > value ? nearest - 1.0f : nearest;
}

// SAT's code min(floor(u 2^b), 2^b - 1): ATen's clamp_max lets a NaN through, as std::min(value, top) does
inline float sat_code(float unit, float steps, float top) { return std::min(floor_finite(unit * steps), top); }

MBQ_TARGET_CLONES bool sat_forward_loop(const float* unit, float* out, int64_t count, float steps) {
  const float top = steps - 1.0f;
  uint32_t special = 0;
  for (int64_t i = 0; i < count; ++i) {
    special |= not_finite(unit[i]);
    out[i] = (sat_code(unit[i], steps, top) / steps) * 2.0f - 1.0f;
  }
  return special == 0;
}

// the centered scheme: the code's bucket centre, j + 1/2
MBQ_TARGET_CLONES bool sat_centered_forward_loop(const float* unit, float* out, int64_t count, float steps) {
  const float top = steps - 1.0f;
  uint32_t special = 0;
  for (int64_t i = 0; i < count; ++i) {
    special |= not_finite(unit[i]);
    out[i] = ((sat_code(unit[i], steps, top) + 0.5f) / steps) * 2.0f - 1.0f;
  }
  return special == 0;
}

MBQ_TARGET_CLONES bool sat_backward_loop(const float* grad, const float* factor, float* grad_squashed,
                                         float* to_max, int64_t count, float steps, float max_abs) {
  uint32_t special = 0;
  for (int64_t i = 0; i < count; ++i) {
    special |= not_finite(grad[i]) | not_finite(factor[i]);
    const float grad_normalized = (((grad[i] * 2.0f) / steps) * steps) / 2.0f;
    to_max[i] = (-grad_normalized) * factor[i];
    grad_squashed[i] = grad_normalized / max_abs;
  }
  return special == 0;
}

// max|t|, or NaN where a value is not finite (a NaN weight: the caller declines it). The bit patterns of
// non-negative floats order as their values do, and every infinity or NaN pattern lies above the finite ones, so an
// integer max (which vectorizes) finds both the max and whether anything was not finite.
MBQ_TARGET_CLONES float max_abs_loop(const float* t, int64_t count) {
  uint32_t top = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    const float magnitude = std::fabs(t[i]);
    std::memcpy(&bits, &magnitude, sizeof bits);
    top = bits > top ? bits : top;
  }
  float value;
  std::memcpy(&value, &top, sizeof value);
  return top < 0x7F800000u ? value : std::nanf("");
}

// finite and not zero: the terms' divisions by M (or 2M) then give finite values
bool usable_max(float max_abs) { return std::isfinite(max_abs) && max_abs != 0.0f; }

// sgn(t) as ATen's sign computes it, (0 < t) - (t < 0): +0 for either zero and for NaN
inline float sign_of(float t) { return static_cast<float>(static_cast<int>(0.0f < t) - static_cast<int>(t < 0.0f)); }

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

// w~ = s / M, u = (w~ + 1) / 2, f = (s / M) / M and sgn(s)
MBQ_TARGET_CLONES void sat_terms_loop(const float* s, float* normalized, float* unit, float* factor, float* sign,
                                      int64_t count, float max_abs) {
  for (int64_t i = 0; i < count; ++i) {
    const float over = s[i] / max_abs;
    normalized[i] = over;
    unit[i] = (over + 1.0f) / 2.0f;
    factor[i] = over / max_abs;
    sign[i] = sign_of(s[i]);
  }
}

// [|t| = M] and how many elements are there (the elements the max's gradient is shared among)
MBQ_TARGET_CLONES int64_t at_max_loop(const float* t, uint8_t* at_max, int64_t count, float max_abs) {
  int64_t ties = 0;
  for (int64_t i = 0; i < count; ++i) {
    at_max[i] = static_cast<uint8_t>(std::fabs(t[i]) == max_abs);
    ties += at_max[i];
  }
  return ties;
}

TensorList dorefa_weight_forward(const TensorList& units, const TensorList& scales, double levels) {
  if (!all_contiguous_cpu(units, at::kFloat) || !one_each(scales, units.size(), at::kFloat)) {
    return {};
  }
  const auto steps = static_cast<float>(levels);
  TensorList outputs;
  outputs.reserve(units.size());
  for (size_t i = 0; i < units.size(); ++i) {
    auto out = at::empty_like(units[i]);
    const float scale = value_of<float>(scales[i]);
    if (!dorefa_forward_loop(units[i].const_data_ptr<float>(), out.mutable_data_ptr<float>(), out.numel(), steps,
                             scale) ||
        !std::isfinite(scale)) {
      return {};
    }
    outputs.push_back(std::move(out));
  }
  return outputs;
}

std::tuple<TensorList, TensorList> dorefa_weight_backward(const TensorList& grads, const TensorList& scales,
                                                          const TensorList& twice_max, const TensorList& factors) {
  const auto layers = grads.size();
  if (!all_contiguous_cpu(grads, at::kFloat) || !all_contiguous_cpu(factors, at::kFloat) || !same_sizes(factors, grads) ||
      !one_each(scales, layers, at::kFloat) || !one_each(twice_max, layers, at::kFloat)) {
    return {};
  }
  TensorList grad_normalized, grad_max;
  grad_normalized.reserve(layers);
  grad_max.reserve(layers);
  for (size_t i = 0; i < layers; ++i) {
    auto normalized = at::empty_like(grads[i]);
    auto to_max = at::empty_like(grads[i]);
    const float scale = value_of<float>(scales[i]), denominator = value_of<float>(twice_max[i]);
    if (!dorefa_backward_loop(grads[i].const_data_ptr<float>(), factors[i].const_data_ptr<float>(),
                              normalized.mutable_data_ptr<float>(), to_max.mutable_data_ptr<float>(),
                              grads[i].numel(), scale, denominator) ||
        !std::isfinite(scale) || !usable_max(denominator)) {
      return {};
    }
    grad_normalized.push_back(std::move(normalized));
    grad_max.push_back(at::sum(to_max).mul_(2));  // ATen's summation order, then the product by 2
  }
  return {grad_normalized, grad_max};
}

// DoReFa's bit-width-independent terms of one weight: E = mean|w| and t = tanh(w) by ATen (its summation order, its
// tanh), then M = max|t|, D = 2M and, in one pass, u, f, the elements at the max, their count and sgn(t)
std::vector<Tensor> dorefa_weight_terms(const Tensor& weight) {
  if (!contiguous_cpu(weight, at::kFloat) || weight.numel() == 0) {
    return {};
  }
  auto scale = at::mean(at::abs(weight));
  auto normalized = at::tanh(weight);
  const auto* t = normalized.const_data_ptr<float>();
  const float max_abs = max_abs_loop(t, normalized.numel());
  const float twice_max = 2.0f * max_abs;
  if (!usable_max(max_abs) || !std::isfinite(value_of<float>(scale))) {
    return {};
  }
  auto unit = at::empty_like(normalized);
  auto factor = at::empty_like(normalized);
  auto at_max = at::empty_like(normalized, normalized.options().dtype(at::kBool));
  auto sign = at::empty_like(normalized);
  dorefa_terms_loop(t, unit.mutable_data_ptr<float>(), factor.mutable_data_ptr<float>(), sign.mutable_data_ptr<float>(),
                    normalized.numel(), twice_max);
  const auto ties =
      at_max_loop(t, reinterpret_cast<uint8_t*>(at_max.mutable_data_ptr<bool>()), normalized.numel(), max_abs);
  const auto scalar = normalized.options().dtype(at::kFloat);
  return {scale,  normalized,
          at::scalar_tensor(max_abs, scalar), at::scalar_tensor(twice_max, scalar),
          unit,   factor,
          at_max, at::scalar_tensor(ties, scalar.dtype(at::kLong)),
          sign};
}

// SAT's bit-width-independent terms of one weight: s = tanh(w) by ATen, M = max|s|, and in one pass w~, u, f, the
// elements at the max, their count and sgn(s)
std::vector<Tensor> sat_weight_terms(const Tensor& weight) {
  if (!contiguous_cpu(weight, at::kFloat) || weight.numel() == 0) {
    return {};
  }
  auto squashed = at::tanh(weight);
  const float max_abs = max_abs_loop(squashed.const_data_ptr<float>(), squashed.numel());
  if (!usable_max(max_abs)) {
    return {};
  }
  auto normalized = at::empty_like(squashed);
  auto unit = at::empty_like(squashed);
  auto factor = at::empty_like(squashed);
  auto at_max = at::empty_like(squashed, squashed.options().dtype(at::kBool));
  auto sign = at::empty_like(squashed);
  sat_terms_loop(squashed.const_data_ptr<float>(), normalized.mutable_data_ptr<float>(), unit.mutable_data_ptr<float>(),
                 factor.mutable_data_ptr<float>(), sign.mutable_data_ptr<float>(), squashed.numel(), max_abs);
  const auto ties = at_max_loop(squashed.const_data_ptr<float>(),
                                reinterpret_cast<uint8_t*>(at_max.mutable_data_ptr<bool>()), squashed.numel(), max_abs);
  const auto scalar = squashed.options().dtype(at::kFloat);
  return {squashed, at::scalar_tensor(max_abs, scalar), normalized, unit, factor, at_max,
          at::scalar_tensor(ties, scalar.dtype(at::kLong)), sign};
}

TensorList sat_weight_forward(const TensorList& units, double steps, bool centered) {
  if (!all_contiguous_cpu(units, at::kFloat)) {
    return {};
  }
  TensorList outputs;
  outputs.reserve(units.size());
  for (const auto& unit : units) {
    auto out = at::empty_like(unit);
    const auto loop = centered ? sat_centered_forward_loop : sat_forward_loop;
    if (!loop(unit.const_data_ptr<float>(), out.mutable_data_ptr<float>(), out.numel(), static_cast<float>(steps))) {
      return {};
    }
    outputs.push_back(std::move(out));
  }
  return outputs;
}

std::tuple<TensorList, TensorList> sat_weight_backward(const TensorList& grads, const TensorList& max_abs,
                                                       const TensorList& factors, double steps) {
  const auto layers = grads.size();
  if (!all_contiguous_cpu(grads, at::kFloat) || !all_contiguous_cpu(factors, at::kFloat) || !same_sizes(factors, grads) ||
      !one_each(max_abs, layers, at::kFloat)) {
    return {};
  }
  TensorList grad_squashed, grad_max;
  grad_squashed.reserve(layers);
  grad_max.reserve(layers);
  for (size_t i = 0; i < layers; ++i) {
    auto squashed = at::empty_like(grads[i]);
    auto to_max = at::empty_like(grads[i]);
    const float top = value_of<float>(max_abs[i]);
    if (!sat_backward_loop(grads[i].const_data_ptr<float>(), factors[i].const_data_ptr<float>(),
                           squashed.mutable_data_ptr<float>(), to_max.mutable_data_ptr<float>(), grads[i].numel(),
                           static_cast<float>(steps), top) ||
        !usable_max(top)) {
      return {};
    }
    grad_squashed.push_back(std::move(squashed));
    grad_max.push_back(at::sum(to_max));  // ATen's summation order
  }
  return {grad_squashed, grad_max};
}

TensorList tanh_max_backward(const TensorList& grad_normalized, const TensorList& grad_max, const TensorList& at_max,
                             const TensorList& ties, const TensorList& signs, const TensorList& tanh_w) {
  const auto layers = grad_normalized.size();
  if (!all_contiguous_cpu(grad_normalized, at::kFloat) || !all_contiguous_cpu(tanh_w, at::kFloat) || !all_contiguous_cpu(signs, at::kFloat) ||
      !all_contiguous_cpu(at_max, at::kBool) || !same_sizes(tanh_w, grad_normalized) || !same_sizes(signs, grad_normalized) ||
      !same_sizes(at_max, grad_normalized) || !one_each(grad_max, layers, at::kFloat) ||
      !one_each(ties, layers, at::kLong)) {
    return {};
  }
  TensorList outputs;
  outputs.reserve(layers);
  for (size_t i = 0; i < layers; ++i) {
    // the max's gradient shared among its ties: a float32 division, as ATen divides a float by an integer tensor
    const float per_tie = value_of<float>(grad_max[i]) / static_cast<float>(value_of<int64_t>(ties[i]));
    auto out = at::empty_like(grad_normalized[i]);
    if (!shared_max_loop(grad_normalized[i].const_data_ptr<float>(),
                         reinterpret_cast<const uint8_t*>(at_max[i].const_data_ptr<bool>()),
                         signs[i].const_data_ptr<float>(), tanh_w[i].const_data_ptr<float>(),
                         out.mutable_data_ptr<float>(), out.numel(), per_tie) ||
        !std::isfinite(per_tie)) {
      return {};
    }
    at::tanh_backward_out(out, out, tanh_w[i]);  // autograd's own kernel for tanh's derivative, in place
    outputs.push_back(std::move(out));
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  m.def("dorefa_weight_forward(Tensor[] units, Tensor[] scales, float levels) -> Tensor[]");
  m.def("dorefa_weight_backward(Tensor[] grads, Tensor[] scales, Tensor[] twice_max, Tensor[] factors) -> "
        "(Tensor[], Tensor[])");
  m.def("dorefa_weight_terms(Tensor weight) -> Tensor[]");
  m.def("sat_weight_terms(Tensor weight) -> Tensor[]");
  m.def("sat_weight_forward(Tensor[] units, float steps, bool centered) -> Tensor[]");
  m.def("sat_weight_backward(Tensor[] grads, Tensor[] max_abs, Tensor[] factors, float steps) -> "
        "(Tensor[], Tensor[])");
  m.def("tanh_max_backward(Tensor[] grad_normalized, Tensor[] grad_max, Tensor[] at_max, Tensor[] ties, "
        "Tensor[] signs, Tensor[] tanh_w) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CompositeExplicitAutograd, m) {
  m.impl("dorefa_weight_forward", &dorefa_weight_forward);
  m.impl("dorefa_weight_backward", &dorefa_weight_backward);
  m.impl("dorefa_weight_terms", &dorefa_weight_terms);
  m.impl("sat_weight_terms", &sat_weight_terms);
  m.impl("sat_weight_forward", &sat_weight_forward);
  m.impl("sat_weight_backward", &sat_weight_backward);
  m.impl("tanh_max_backward", &tanh_max_backward);
}
