// SAT's weight quantizer (Jin et al., arXiv 1912.10207, in AdaBits' form, arXiv 1912.09666, Sec. 3.2;
// methods/quant/sat.py) over a list of layers, as weight_lists.cpp does DoReFa's, with s = tanh(w), M = max|s|:
//   sat_weight_terms        s, M, w~ = s / M, u, (s / M) / M, [|s| = M], its count, sgn(s)
//   sat_weight_forward      2 (min(floor(u 2^b), 2^b - 1) [+ 1/2]) / 2^b - 1          with u = (s / M + 1) / 2
//   sat_weight_backward     g_s = g~ / M and the sum of -g~ * (s / M) / M,   g~ = (((2 g) / 2^b) 2^b) / 2
// The gradient through the max and tanh is weight_lists.cpp's tanh_max_backward. Same bits as the list operations,
// on the same terms as there; what declines an input: weight_lists.h.
#include <torch/library.h>

#include "weight_lists.h"

namespace {

// The loops return whether every value they read was finite (weight_lists.h).
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

// SAT's bit-width-independent terms of one weight: s = tanh(w), M = max|s|, and in one pass w~, u, f and sgn(s);
// then the elements at the max and their count
std::vector<Tensor> sat_weight_terms(const Tensor& weight) {
  auto [squashed, max_abs] = tanh_and_max(weight);
  if (!squashed.defined()) {
    return {};
  }
  auto normalized = at::empty_like(squashed), unit = at::empty_like(squashed), factor = at::empty_like(squashed),
       sign = at::empty_like(squashed);
  sat_terms_loop(squashed.const_data_ptr<float>(), normalized.mutable_data_ptr<float>(),
                 unit.mutable_data_ptr<float>(), factor.mutable_data_ptr<float>(), sign.mutable_data_ptr<float>(),
                 squashed.numel(), max_abs);
  auto [at_max, ties] = ties_of(squashed, max_abs);
  return {squashed, float_scalar(max_abs, squashed), normalized, unit, factor, at_max, ties, sign};
}

TensorList sat_weight_forward(const TensorList& units, double steps, bool centered) {
  if (!all_contiguous_cpu(units, at::kFloat)) {
    return {};
  }
  const auto loop = centered ? sat_centered_forward_loop : sat_forward_loop;
  return per_layer(units, [&](size_t i, Tensor& out) {
    return loop(units[i].const_data_ptr<float>(), out.mutable_data_ptr<float>(), out.numel(),
                static_cast<float>(steps));
  });
}

std::tuple<TensorList, TensorList> sat_weight_backward(const TensorList& grads, const TensorList& max_abs,
                                                       const TensorList& factors, double steps) {
  if (!all_contiguous_cpu(grads, at::kFloat) || !all_contiguous_cpu(factors, at::kFloat) ||
      !same_sizes(factors, grads) || !one_each(max_abs, grads.size(), at::kFloat)) {
    return {};
  }
  return backward_heads(grads, [&](size_t i, Tensor& head, Tensor& to_max) {
    const float top = value_of<float>(max_abs[i]);
    return usable_max(top) &&
           sat_backward_loop(grads[i].const_data_ptr<float>(), factors[i].const_data_ptr<float>(),
                             head.mutable_data_ptr<float>(), to_max.mutable_data_ptr<float>(), grads[i].numel(),
                             static_cast<float>(steps), top);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  m.def("sat_weight_terms(Tensor weight) -> Tensor[]");
  m.def("sat_weight_forward(Tensor[] units, float steps, bool centered) -> Tensor[]");
  m.def("sat_weight_backward(Tensor[] grads, Tensor[] max_abs, Tensor[] factors, float steps) -> "
        "(Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CompositeExplicitAutograd, m) {
  m.impl("sat_weight_terms", &sat_weight_terms);
  m.impl("sat_weight_forward", &sat_weight_forward);
  m.impl("sat_weight_backward", &sat_weight_backward);
}
