// EMQ's weight bias correction (Kim et al., NeurIPS 2025, arXiv 2510.20673, Eq. 2) over the list of a network's
// layers, per-layer statistics: for each quantized weight w_q, with its reference's E[w] and V[w],
//   scale = V[w_q] > v_min ? sqrt(V[w] / max(V[w_q], v_min)) : 1,   shift = E[w] - E[w_q],
//   w'_q = scale * (w_q + shift)
// in one call, where methods/quant/bias_correction.py's list path makes about nine calls per layer (the
// statistics, the comparison, the clamp, the division, the root, the selection, the difference) and two list
// operations. The statistics stay ATen's mean and var (their summation order); the scalar steps and the loop are
// the same float operations (the root ATen's own, which is not always correctly rounded), so the same bits. A layer
// whose shift or scale is not finite (a weight that was not) makes the operator answer an empty list, and the list
// path runs (weight_lists.h's rule).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "weight_lists.h"

namespace {

// ATen's float32 sqrt (its kernel on a tensor of one element, as the list path takes it): torch 2.14's CPU sqrt
// is not always the correctly rounded root std::sqrt gives (sqrt(0.52122122f) is 1 ulp below it)
float root(float value, const Tensor& like) { return value_of<float>(at::sqrt(at::full_like(like, value))); }

MBQ_TARGET_CLONES void corrected_loop(const float* quantized, float* out, int64_t count, float shift, float scale) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = scale * (quantized[i] + shift);
  }
}

std::tuple<TensorList, TensorList> bias_correct(const TensorList& quantized, const TensorList& reference_means,
                                                const TensorList& reference_variances, double min_variance) {
  const auto layers = quantized.size();
  if (!all_contiguous_cpu(quantized, at::kFloat) || !one_each(reference_means, layers, at::kFloat) ||
      !one_each(reference_variances, layers, at::kFloat)) {
    return {};
  }
  const auto floor = static_cast<float>(min_variance);  // a float tensor compares with and clamps to it as float
  TensorList scales;
  auto corrected = per_layer(quantized, [&](size_t i, Tensor& out) {
    const auto& q = quantized[i];
    if (q.numel() == 0) {
      return false;
    }
    std::vector<int64_t> dims(q.dim());
    std::iota(dims.begin(), dims.end(), 0);
    const auto mean_q = at::mean(q, dims, /*keepdim=*/true);
    const auto var_q = at::var(q, dims, /*correction=*/0, /*keepdim=*/true);
    const float variance = value_of<float>(var_q);
    const float scale = variance > floor ? root(value_of<float>(reference_variances[i]) / std::max(variance, floor),
                                                var_q)
                                         : 1.0f;
    const float shift = value_of<float>(reference_means[i]) - value_of<float>(mean_q);
    if (!std::isfinite(scale) || !std::isfinite(shift)) {
      return false;
    }
    corrected_loop(q.const_data_ptr<float>(), out.mutable_data_ptr<float>(), q.numel(), shift, scale);
    scales.push_back(at::full_like(var_q, scale));
    return true;
  });
  return {corrected, corrected.empty() ? TensorList{} : scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  m.def("bias_correct(Tensor[] quantized, Tensor[] reference_means, Tensor[] reference_variances, "
        "float min_variance) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CompositeExplicitAutograd, m) { m.impl("bias_correct", &bias_correct); }
