// MBQuant's bounded quantizer as an operator with a C++ autograd node (bounded_quantize): methods/quant/bounded.py's
// _BoundedQuantize with plain STE, so that no Python runs in either pass. It runs the loops of bounded.cpp (through
// the dispatcher, so a profile names them) where they give the eager bits, and the function's eager passes written
// out in ATen elsewhere. Where its forward loop runs the node keeps x for the backward pass and takes
// n = (x - l) / (u - l) from it again there (the same float operations, so the same n): the forward pass writes q
// alone, and no n the size of x waits for the backward pass. The steps on the bounds themselves (1 / (u - l)
// forward, the gradients of l and u from the sums backward) are scalar loops for a pair of bounds of one shape.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "native_loops.h"

namespace {

// bounded.py's MIN_BOUND_GAP, and the bounds of its inclusive mask: one float32 step outside [0, 1]
constexpr double kMinBoundGap = 1e-8;
constexpr double kBelow = -static_cast<double>(std::numeric_limits<float>::min());
constexpr double kAbove = 1.0 + static_cast<double>(std::numeric_limits<float>::epsilon());

// The node's loops through the dispatcher, so that a profile names them inside its passes
at::Tensor dispatch_quantized(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& inverse_gap,
                              double levels) {
  static const auto op = mbq::operator_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         double)>("mbqbench_native::bounded_quantized");
  return op.call(x, lower, inverse_gap, levels);
}

std::tuple<at::Tensor, at::Tensor> dispatch_backward_from_input(const at::Tensor& x, const at::Tensor& lower,
                                                                const at::Tensor& inverse_gap, const at::Tensor& grad,
                                                                double below, double above) {
  static const auto op = mbq::operator_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>(
      "mbqbench_native::bounded_backward_from_input");
  return op.call(x, lower, inverse_gap, grad, below, above);
}

// Bounds of one shape, contiguous float32 on the CPU (a pair per channel or per branch): their own small steps run
// as one scalar loop each, the same float operations as the ATen calls they replace, element by element, where
// those calls (four forward, six backward, a few microseconds each) cost more than the loop over x at 8x8.
bool paired_bounds(const at::Tensor& lower, const at::Tensor& upper) {
  return lower.sizes() == upper.sizes() && lower.scalar_type() == at::kFloat && upper.scalar_type() == at::kFloat &&
         lower.is_cpu() && upper.is_cpu() && lower.is_contiguous() && upper.is_contiguous();
}

// 1 / (u - l); 1.0 / t in Python is t.reciprocal() * 1.0, and a float tensor's clamp_min and >= take the double
// bound as float
at::Tensor inverse_gap_of(const at::Tensor& lower, const at::Tensor& upper) {
  if (!paired_bounds(lower, upper)) {
    return at::reciprocal((upper - lower).clamp_min(kMinBoundGap)) * 1.0;
  }
  auto inverse_gap = at::empty_like(lower);
  const float* low = lower.const_data_ptr<float>();
  const float* high = upper.const_data_ptr<float>();
  float* out = inverse_gap.data_ptr<float>();
  const auto min_gap = static_cast<float>(kMinBoundGap);
  for (int64_t i = 0; i < lower.numel(); ++i) {
    const float gap = high[i] - low[i];
    out[i] = 1.0f / (std::isnan(gap) ? gap : std::max(gap, min_gap));
  }
  return inverse_gap;
}

// The bounds' gradients from the sums of g_n * n and of g_n over each bound's elements:
// dn/dl = (n - 1) / (u - l) and dn/du = -n / (u - l); the n-terms vanish where the gap is clamped
std::tuple<at::Tensor, at::Tensor> bound_gradients(const at::Tensor& lower, const at::Tensor& upper,
                                                   const at::Tensor& grad_normalized, const at::Tensor& product) {
  if (!paired_bounds(lower, upper) || at::GradMode::is_enabled()) {  // a double backward records the ATen calls
    const auto gap = upper - lower;
    const auto weighted = product.sum_to_size(gap.sizes()) * (gap >= kMinBoundGap);
    return {(weighted - grad_normalized.sum_to_size(gap.sizes())).sum_to_size(lower.sizes()),
            (-weighted).sum_to_size(upper.sizes())};
  }
  const auto product_sums = product.sum_to_size(lower.sizes()).contiguous();
  const auto grad_sums = grad_normalized.sum_to_size(lower.sizes()).contiguous();
  auto grad_lower = at::empty_like(lower);
  auto grad_upper = at::empty_like(upper);
  const float* low = lower.const_data_ptr<float>();
  const float* high = upper.const_data_ptr<float>();
  const float* weighted_sum = product_sums.const_data_ptr<float>();
  const float* grad_sum = grad_sums.const_data_ptr<float>();
  float* out_lower = grad_lower.data_ptr<float>();
  float* out_upper = grad_upper.data_ptr<float>();
  const auto min_gap = static_cast<float>(kMinBoundGap);
  for (int64_t i = 0; i < lower.numel(); ++i) {
    const float weighted = weighted_sum[i] * (high[i] - low[i] >= min_gap ? 1.0f : 0.0f);
    out_lower[i] = weighted - grad_sum[i];
    out_upper[i] = -weighted;
  }
  return {grad_lower, grad_upper};
}

// bounded.py's eager n, the bits the loops compute
at::Tensor normalized_of(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& inverse_gap) {
  return (x - lower).mul_(inverse_gap);
}

// q from the loop, or an undefined tensor where it does not run or would write another layout
at::Tensor quantized_by_loop(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& inverse_gap,
                             int64_t levels, int64_t forward_min) {
  if (mbq::loop_runs(x, {lower, inverse_gap}, forward_min)) {
    auto quantized = dispatch_quantized(x, lower, inverse_gap, static_cast<double>(levels));
    if (mbq::in_layout_of(x, {quantized})) {
      return quantized;
    }
  }
  return at::Tensor();
}

at::Tensor quantized_of(const at::Tensor& normalized, int64_t levels) {
  return normalized.clamp(0.0, 1.0).mul_(levels).round_().div_(levels);
}

// q below autograd (evaluation, inference mode)
at::Tensor bounded_quantize_cpu(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& upper, int64_t levels,
                                int64_t forward_min, int64_t /*backward_min*/) {
  const auto inverse_gap = inverse_gap_of(lower, upper);
  auto quantized = quantized_by_loop(x, lower, inverse_gap, levels, forward_min);
  return quantized.defined() ? quantized : quantized_of(normalized_of(x, lower, inverse_gap), levels);
}

// bounded.py's _BoundedQuantize in C++ (plain STE): the loops where they run, its eager passes elsewhere. Where the
// forward loop ran, x is saved and the backward pass takes n from it again (in its loop, or in the eager pass).
class BoundedQuantize : public torch::autograd::Function<BoundedQuantize> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lower,
                            const at::Tensor& upper, int64_t levels, int64_t forward_min, int64_t backward_min) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto inverse_gap = inverse_gap_of(lower, upper);
    auto quantized = quantized_by_loop(x, lower, inverse_gap, levels, forward_min);
    const bool saved_input = quantized.defined();
    if (saved_input) {
      ctx->save_for_backward({x, lower, upper, inverse_gap});
    } else {
      const auto normalized = normalized_of(x, lower, inverse_gap);
      quantized = quantized_of(normalized, levels);
      ctx->save_for_backward({normalized, lower, upper, inverse_gap});
    }
    ctx->saved_data["saved_input"] = saved_input;
    ctx->saved_data["backward_min"] = backward_min;
    return quantized;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &lower = saved[1], &upper = saved[2], &inverse_gap = saved[3];
    const auto& grad = grads[0];
    at::Tensor normalized, grad_normalized, product;
    if (ctx->saved_data["saved_input"].toBool()) {
      const auto& x = saved[0];
      if (mbq::loop_runs(x, {lower, inverse_gap, grad}, ctx->saved_data["backward_min"].toInt())) {
        std::tie(grad_normalized, product) =
            dispatch_backward_from_input(x, lower, inverse_gap, grad, kBelow, kAbove);
        if (!mbq::in_layout_of(x, {grad_normalized, product})) {
          grad_normalized = product = at::Tensor();
        }
      }
      if (!grad_normalized.defined()) {  // without a history, as the autograd function's saved n has none
        normalized = normalized_of(x.detach(), lower.detach(), inverse_gap);
      }
    } else {
      normalized = saved[0];
    }
    if (!grad_normalized.defined()) {  // inclusive_unit_mask_backward, in n's layout
      const auto scaled = grad * inverse_gap;
      if (at::GradMode::is_enabled() && (scaled.requires_grad() || normalized.requires_grad())) {
        // a double backward records it (an out= call cannot be recorded)
        grad_normalized = at::hardtanh_backward(scaled, normalized, kBelow, kAbove);
      } else {
        grad_normalized = at::empty_like(normalized);
        at::hardtanh_backward_out(grad_normalized, scaled, normalized, kBelow, kAbove);
      }
      product = at::Tensor();
    }
    at::Tensor grad_lower, grad_upper;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      if (!product.defined()) {
        product = grad_normalized * normalized;
      }
      std::tie(grad_lower, grad_upper) = bound_gradients(lower, upper, grad_normalized, product);
    }
    return {ctx->needs_input_grad(0) ? grad_normalized : at::Tensor(), grad_lower, grad_upper, at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor bounded_quantize_autograd(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& upper,
                                     int64_t levels, int64_t forward_min, int64_t backward_min) {
  return BoundedQuantize::apply(x, lower, upper, levels, forward_min, backward_min);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  // the loops from forward_min and backward_min elements (kernels.py's native_min_elements of each)
  m.def("bounded_quantize(Tensor x, Tensor lower, Tensor upper, int levels, int forward_min, int backward_min) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CPU, m) { m.impl("bounded_quantize", &bounded_quantize_cpu); }

TORCH_LIBRARY_IMPL(mbqbench_native, Autograd, m) { m.impl("bounded_quantize", &bounded_quantize_autograd); }
