// PACT's activation quantizer (Choi et al., arXiv 1805.06085; AdaBits' form, Jin et al., arXiv 1912.09666,
// Sec. 3.3) as two CPU loops, each one pass over memory where eager PyTorch makes six passes forward and about twelve
// backward, and an operator with a C++ autograd node that runs them (pact_quantize, below), so that no Python runs
// in either pass; methods/quant/pact.py's autograd function calls the loops where the node does not run:
//   forward   y = round(L clamp(x, 0, a) / a) / L * a
//   backward  g where 0 < x < a (else 0), and g * dy/da with dy/da = (round(s) - s) / L + [x >= a],
//             s = clamp(x, 0, a) / a * L; the caller sums the second output with ATen's sum, as the eager path does.
// Same bits as methods/quant/pact.py's eager passes: the same IEEE operations in their order (clamp letting NaN
// through and keeping -0.0, then /a, *L, round half to even, /L, *a; threshold_backward's "x <= 0 gives +0"),
// built with -ffp-contract=off and without -ffast-math.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

#include "native_loops.h"

namespace {

using mbq::at_stride;

// the clipping level a, a one-element float tensor (read on the host: these loops run on the CPU)
float clip_value(const at::Tensor& clip) {
  TORCH_CHECK(clip.numel() == 1 && clip.scalar_type() == at::kFloat, "PACT: the clipping level is one float32");
  return clip.item<float>();
}

inline float clip_between(float value, float clip) { return mbq::aten_clamp(value, 0.0f, clip); }

inline float pact_value(float x, float clip, float levels) {
  return std::rint(clip_between(x, clip) / clip * levels) / levels * clip;
}

inline void pact_gradients(float x, float grad, float clip, float levels, float* grad_x, float* product) {
  *grad_x = (x <= 0.0f || clip - x <= 0.0f) ? 0.0f : grad;
  const float scaled = clip_between(x, clip) / clip * levels;
  const float dy_da = (std::rint(scaled) - scaled) / levels + (x >= clip ? 1.0f : 0.0f);
  *product = grad * dy_da;
}

MBQ_TARGET_CLONES void pact_forward_contiguous(const float* x, float* out, int64_t count, float clip, float levels) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = pact_value(x[i], clip, levels);
  }
}

MBQ_TARGET_CLONES void pact_backward_contiguous(const float* x, const float* grad, float* grad_x, float* product,
                                                int64_t count, float clip, float levels) {
  for (int64_t i = 0; i < count; ++i) {
    pact_gradients(x[i], grad[i], clip, levels, grad_x + i, product + i);
  }
}

at::Tensor pact_forward(const at::Tensor& x, const at::Tensor& clip, double levels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pact_forward: expected float32, got ", x.scalar_type());
  const auto a = clip_value(clip);
  const auto scale = static_cast<float>(levels);
  return mbq::elementwise({x}, 1, [a, scale](char** data, const int64_t* strides, int64_t count) {
    if (strides[0] == mbq::kFloat && strides[1] == mbq::kFloat) {
      pact_forward_contiguous(reinterpret_cast<const float*>(data[1]), reinterpret_cast<float*>(data[0]), count, a,
                              scale);
    } else {
      for (int64_t i = 0; i < count; ++i) {
        *at_stride<float>(data[0], strides[0], i) = pact_value(*at_stride<float>(data[1], strides[1], i), a, scale);
      }
    }
  })[0];
}

std::tuple<at::Tensor, at::Tensor> pact_backward(const at::Tensor& x, const at::Tensor& clip, const at::Tensor& grad,
                                                 double levels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat,
              "pact_backward: expected float32 tensors");
  const auto a = clip_value(clip);
  const auto scale = static_cast<float>(levels);
  // operands: 0 gradient at x, 1 g dy/da (outputs), 2 x, 3 upstream gradient
  auto outputs = mbq::elementwise({x, grad}, 2, [a, scale](char** data, const int64_t* strides, int64_t count) {
    const bool unit = strides[0] == mbq::kFloat && strides[1] == mbq::kFloat && strides[2] == mbq::kFloat &&
                      strides[3] == mbq::kFloat;
    if (unit) {
      pact_backward_contiguous(reinterpret_cast<const float*>(data[2]), reinterpret_cast<const float*>(data[3]),
                               reinterpret_cast<float*>(data[0]), reinterpret_cast<float*>(data[1]), count, a, scale);
    } else {
      for (int64_t i = 0; i < count; ++i) {
        pact_gradients(*at_stride<float>(data[2], strides[2], i), *at_stride<float>(data[3], strides[3], i), a, scale,
                       at_stride<float>(data[0], strides[0], i), at_stride<float>(data[1], strides[1], i));
      }
    }
  });
  return {outputs[0], outputs[1]};
}

// The loops through the dispatcher, so that a profile names them inside the node's passes
at::Tensor dispatch_forward(const at::Tensor& x, const at::Tensor& clip, double levels) {
  static const auto op = mbq::operator_handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
      "mbqbench_native::pact_forward");
  return op.call(x, clip, levels);
}

std::tuple<at::Tensor, at::Tensor> dispatch_backward(const at::Tensor& x, const at::Tensor& clip,
                                                     const at::Tensor& grad, double levels) {
  static const auto op = mbq::operator_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("mbqbench_native::pact_backward");
  return op.call(x, clip, grad, levels);
}

// pact.py's _clip: min(relu(x), a); a clipping level without gradient and dimensions bounds torch.clamp as a number
at::Tensor clip_between(const at::Tensor& x, const at::Tensor& clip) {
  return !clip.requires_grad() && clip.dim() == 0 ? at::clamp(x, 0.0, clip.item()) : at::minimum(at::relu(x), clip);
}

// The eager passes of methods/quant/pact.py's backward, operation for operation, where the loop does not run: while
// autograd records them (a double backward; they are then differentiable) or with the upstream gradient in another
// layout than x (the loop's sum would add in another order).
std::tuple<at::Tensor, at::Tensor> pact_backward_passes(const at::Tensor& x, const at::Tensor& alpha,
                                                        const at::Tensor& clip, const at::Tensor& grad,
                                                        int64_t levels) {
  const auto grad_x = at::threshold_backward(at::threshold_backward(grad, x, 0), clip - x, 0);
  auto scaled = clip_between(x, clip).div_(clip).mul_(levels);
  const auto dy_da = (at::round(scaled) - scaled).div_(levels).add_(x >= clip);
  return {grad_x, (grad * dy_da).sum().reshape(alpha.sizes()) * alpha.sgn()};
}

// y = round(L clamp(x, 0, |alpha|) / |alpha|) / L * |alpha|, below autograd: the loop, or pact.py's eager passes
// where it does not run
at::Tensor pact_quantize_cpu(const at::Tensor& x, const at::Tensor& alpha, int64_t levels) {
  const auto clip = alpha.abs();
  if (mbq::loop_runs(x, {clip})) {
    auto quantized = dispatch_forward(x, clip, static_cast<double>(levels));
    if (mbq::in_layout_of(x, {quantized})) {
      return quantized;
    }
  }
  return clip_between(x, clip).div_(clip).mul_(levels).round_().div_(levels).mul_(clip);
}

// methods/quant/pact.py's autograd function in C++: it saves x and alpha, and its backward returns the gradient at x
// and sum(g dy/da) sign(alpha) at alpha from the loop (or the eager passes, above), the same values
class PACTQuantize : public torch::autograd::Function<PACTQuantize> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& alpha,
                            int64_t levels) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, alpha});
    ctx->saved_data["levels"] = levels;
    return pact_quantize_cpu(x, alpha, levels);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &alpha = saved[1], &grad = grads[0];
    const auto levels = ctx->saved_data["levels"].toInt();
    const auto clip = alpha.abs();
    at::Tensor grad_x, grad_alpha, product;
    if (mbq::loop_runs(x, {clip, grad})) {
      std::tie(grad_x, product) = dispatch_backward(x, clip, grad, static_cast<double>(levels));
    }
    if (product.defined() && mbq::in_layout_of(x, {grad_x, product})) {
      grad_alpha = product.sum().reshape(alpha.sizes()) * alpha.sgn();
    } else {
      std::tie(grad_x, grad_alpha) = pact_backward_passes(x, alpha, clip, grad, levels);
    }
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(), ctx->needs_input_grad(1) ? grad_alpha : at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor pact_quantize_autograd(const at::Tensor& x, const at::Tensor& alpha, int64_t levels) {
  return PACTQuantize::apply(x, alpha, levels);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  // the arguments of methods/quant/kernels.py's formulas, in their order
  m.def("pact_forward(Tensor x, Tensor clip, float levels) -> Tensor");
  m.def("pact_backward(Tensor x, Tensor clip, Tensor grad, float levels) -> (Tensor, Tensor)");
  m.def("pact_quantize(Tensor x, Tensor alpha, int levels) -> Tensor");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CPU, m) {
  m.impl("pact_forward", &pact_forward);
  m.impl("pact_backward", &pact_backward);
  m.impl("pact_quantize", &pact_quantize_cpu);
}

TORCH_LIBRARY_IMPL(mbqbench_native, Autograd, m) { m.impl("pact_quantize", &pact_quantize_autograd); }
