// DoReFa's activation quantizer (Zhou et al., arXiv 1606.06160, Sec. 2.3) as one CPU operator with a C++
// autograd node: forward round(L * clamp(x, 0, 1)) / L in one pass over memory, backward hardtanh_backward(g, x,
// 0, 1) (the straight-through gradient inside (0, 1)). Eager PyTorch makes four passes forward (the clamp, then
// the product, rounding and division) and records a Python-free node only for the clamp; this makes one.
//
// Same bits as the eager composition: each step is the same IEEE operation in the same order (a clamp that lets
// NaN through and keeps -0.0 as ATen's does, a product by L, round half to even under the default rounding mode,
// a division by L). Built with -ffp-contract=off and without -ffast-math, so the compiler may neither contract
// nor reassociate them.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "native_loops.h"

namespace {

inline float clamp_round_unit(float value, float levels) {
  return std::rint(mbq::aten_clamp(value, 0.0f, 1.0f) * levels) / levels;
}

MBQ_TARGET_CLONES void clamp_round_unit_contiguous(const float* src, float* dst, int64_t count, float levels) {
  for (int64_t i = 0; i < count; ++i) {
    dst[i] = clamp_round_unit(src[i], levels);
  }
}

void clamp_round_unit_strided(const char* src, char* dst, int64_t count, int64_t src_stride, int64_t dst_stride,
                              float levels) {
  for (int64_t i = 0; i < count; ++i) {
    *reinterpret_cast<float*>(dst + i * dst_stride) =
        clamp_round_unit(*reinterpret_cast<const float*>(src + i * src_stride), levels);
  }
}

at::Tensor clamp_round_unit_cpu(const at::Tensor& x, int64_t levels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "clamp_round_unit: expected float32, got ", x.scalar_type());
  TORCH_CHECK(levels >= 1, "clamp_round_unit: levels must be at least 1, got ", levels);
  const float scale = static_cast<float>(levels);
  return mbq::elementwise({x}, 1, [scale](char** data, const int64_t* strides, int64_t count) {
    if (strides[0] == mbq::kFloat && strides[1] == mbq::kFloat) {
      clamp_round_unit_contiguous(reinterpret_cast<const float*>(data[1]), reinterpret_cast<float*>(data[0]), count,
                                  scale);
    } else {
      clamp_round_unit_strided(data[1], data[0], count, strides[1], strides[0], scale);
    }
  })[0];
}

at::Tensor clamp_round_unit_below_autograd(const at::Tensor& x, int64_t levels) {
  static const auto op =
      mbq::operator_handle<at::Tensor(const at::Tensor&, int64_t)>("mbqbench_native::clamp_round_unit");
  return op.call(x, levels);
}

class ClampRoundUnit : public torch::autograd::Function<ClampRoundUnit> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t levels) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    return clamp_round_unit_below_autograd(x, levels);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto x = ctx->get_saved_variables()[0];
    return {at::hardtanh_backward(grads[0], x, 0.0, 1.0), at::Tensor()};
  }
};

at::Tensor clamp_round_unit_autograd(const at::Tensor& x, int64_t levels) { return ClampRoundUnit::apply(x, levels); }

}  // namespace

TORCH_LIBRARY(mbqbench_native, m) { m.def("clamp_round_unit(Tensor x, int levels) -> Tensor"); }

TORCH_LIBRARY_IMPL(mbqbench_native, CPU, m) { m.impl("clamp_round_unit", &clamp_round_unit_cpu); }

TORCH_LIBRARY_IMPL(mbqbench_native, Autograd, m) { m.impl("clamp_round_unit", &clamp_round_unit_autograd); }
