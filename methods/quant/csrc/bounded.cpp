// MBQuant's bounded quantizer (Zhong et al., arXiv 2305.08117, Sec. 3.2, in EWGS's form with plain STE) as CPU loops,
// each one pass over memory where eager PyTorch makes five forward and three backward; the bounds broadcast against
// x (one pair per channel or per branch):
//   forward   n = (x - l) * g_inv,  q = round(L clamp(n, 0, 1)) / L
//   backward  g_n = (n <= below or n >= above) ? 0 : g * g_inv  (hardtanh_backward on bounds one step outside
//             [0, 1]), and g_n * n, which the caller sums into the bounds' gradients with ATen's sums.
// bounded_forward / bounded_backward write and read n: methods/quant/kernels.py's run_like calls them inside the
// Python autograd function (EWGS scaling takes it). bounded_quantized / bounded_backward_from_input are the C++
// node's (bounded_node.cpp): they write q alone and take n from x again, with the same float operations.
// Same bits as the eager passes: the same IEEE operations in their order (clamp letting NaN through and keeping
// -0.0, round half to even), built with -ffp-contract=off and without -ffast-math; a NaN n is the one case where
// the eager mask's value depends on the element's position (its vector and scalar loops differ), so there the bits
// may differ.
#include <torch/library.h>

#include <tuple>

#include "native_loops.h"

namespace {

using mbq::at_stride;
using mbq::kFloat;

inline void bounded_values(float x, float lower, float inverse_gap, float levels, float* normalized,
                           float* quantized) {
  const float n = (x - lower) * inverse_gap;
  *normalized = n;
  *quantized = std::rint(mbq::aten_clamp(n, 0.0f, 1.0f) * levels) / levels;
}

inline void bounded_gradients(float n, float inverse_gap, float grad, float below, float above, float* grad_n,
                              float* product) {
  const float masked = (n <= below || n >= above) ? 0.0f : grad * inverse_gap;
  *grad_n = masked;
  *product = masked * n;
}

// One block of TensorIterator's 2-d loop (rows of `count` elements; inner strides first, then outer ones), all of
// it in one per-instruction-set function: rows are as short as 4 elements (a 2x2 map with one bound pair per
// channel), so a call per row, or rounding through a libm call in baseline code, would cost more than the work.
// Operands: 0 normalized, 1 quantized (outputs), 2 x, 3 lower, 4 inverse gap.
MBQ_TARGET_CLONES void bounded_forward_block(char** base, const int64_t* strides, int64_t count, int64_t rows,
                                             float levels) {
  char* data[5] = {base[0], base[1], base[2], base[3], base[4]};
  const bool scalar_bounds =
      strides[0] == kFloat && strides[1] == kFloat && strides[2] == kFloat && strides[3] == 0 && strides[4] == 0;
  for (int64_t row = 0; row < rows; ++row) {
    if (scalar_bounds) {  // the bounds constant along the row: the common case, vectorised
      const auto* x = reinterpret_cast<const float*>(data[2]);
      auto* normalized = reinterpret_cast<float*>(data[0]);
      auto* quantized = reinterpret_cast<float*>(data[1]);
      const float lower = *reinterpret_cast<const float*>(data[3]);
      const float inverse_gap = *reinterpret_cast<const float*>(data[4]);
      for (int64_t i = 0; i < count; ++i) {
        bounded_values(x[i], lower, inverse_gap, levels, normalized + i, quantized + i);
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        bounded_values(*at_stride<float>(data[2], strides[2], i), *at_stride<float>(data[3], strides[3], i),
                       *at_stride<float>(data[4], strides[4], i), levels, at_stride<float>(data[0], strides[0], i),
                       at_stride<float>(data[1], strides[1], i));
      }
    }
    for (int t = 0; t < 5; ++t) {
      data[t] += strides[5 + t];
    }
  }
}

// Operands: 0 gradient at n, 1 its product with n (outputs), 2 n, 3 inverse gap, 4 upstream gradient.
MBQ_TARGET_CLONES void bounded_backward_block(char** base, const int64_t* strides, int64_t count, int64_t rows,
                                              float below, float above) {
  char* data[5] = {base[0], base[1], base[2], base[3], base[4]};
  const bool scalar_gap =
      strides[0] == kFloat && strides[1] == kFloat && strides[2] == kFloat && strides[3] == 0 && strides[4] == kFloat;
  for (int64_t row = 0; row < rows; ++row) {
    if (scalar_gap) {
      const auto* n = reinterpret_cast<const float*>(data[2]);
      const auto* grad = reinterpret_cast<const float*>(data[4]);
      auto* grad_n = reinterpret_cast<float*>(data[0]);
      auto* product = reinterpret_cast<float*>(data[1]);
      const float inverse_gap = *reinterpret_cast<const float*>(data[3]);
      for (int64_t i = 0; i < count; ++i) {
        bounded_gradients(n[i], inverse_gap, grad[i], below, above, grad_n + i, product + i);
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        bounded_gradients(*at_stride<float>(data[2], strides[2], i), *at_stride<float>(data[3], strides[3], i),
                          *at_stride<float>(data[4], strides[4], i), below, above,
                          at_stride<float>(data[0], strides[0], i), at_stride<float>(data[1], strides[1], i));
      }
    }
    for (int t = 0; t < 5; ++t) {
      data[t] += strides[5 + t];
    }
  }
}

// The node's loops: q alone forward; n again from x backward. Operands: 0 q (output), 1 x, 2 lower, 3 inverse gap.
MBQ_TARGET_CLONES void bounded_quantized_block(char** base, const int64_t* strides, int64_t count, int64_t rows,
                                               float levels) {
  char* data[4] = {base[0], base[1], base[2], base[3]};
  const bool scalar_bounds = strides[0] == kFloat && strides[1] == kFloat && strides[2] == 0 && strides[3] == 0;
  float normalized;  // not kept
  for (int64_t row = 0; row < rows; ++row) {
    if (scalar_bounds) {
      const auto* x = reinterpret_cast<const float*>(data[1]);
      auto* quantized = reinterpret_cast<float*>(data[0]);
      const float lower = *reinterpret_cast<const float*>(data[2]);
      const float inverse_gap = *reinterpret_cast<const float*>(data[3]);
      for (int64_t i = 0; i < count; ++i) {
        const float n = (x[i] - lower) * inverse_gap;
        quantized[i] = std::rint(mbq::aten_clamp(n, 0.0f, 1.0f) * levels) / levels;
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        bounded_values(*at_stride<float>(data[1], strides[1], i), *at_stride<float>(data[2], strides[2], i),
                       *at_stride<float>(data[3], strides[3], i), levels, &normalized,
                       at_stride<float>(data[0], strides[0], i));
      }
    }
    for (int t = 0; t < 4; ++t) {
      data[t] += strides[4 + t];
    }
  }
}

// Operands: 0 gradient at n, 1 its product with n (outputs), 2 x, 3 lower, 4 inverse gap, 5 upstream gradient.
MBQ_TARGET_CLONES void bounded_backward_from_input_block(char** base, const int64_t* strides, int64_t count,
                                                         int64_t rows, float below, float above) {
  char* data[6] = {base[0], base[1], base[2], base[3], base[4], base[5]};
  const bool scalar_bounds = strides[0] == kFloat && strides[1] == kFloat && strides[2] == kFloat &&
                             strides[3] == 0 && strides[4] == 0 && strides[5] == kFloat;
  for (int64_t row = 0; row < rows; ++row) {
    if (scalar_bounds) {
      const auto* x = reinterpret_cast<const float*>(data[2]);
      const auto* grad = reinterpret_cast<const float*>(data[5]);
      auto* grad_n = reinterpret_cast<float*>(data[0]);
      auto* product = reinterpret_cast<float*>(data[1]);
      const float lower = *reinterpret_cast<const float*>(data[3]);
      const float inverse_gap = *reinterpret_cast<const float*>(data[4]);
      for (int64_t i = 0; i < count; ++i) {
        bounded_gradients((x[i] - lower) * inverse_gap, inverse_gap, grad[i], below, above, grad_n + i, product + i);
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const float inverse_gap = *at_stride<float>(data[4], strides[4], i);
        const float n = (*at_stride<float>(data[2], strides[2], i) - *at_stride<float>(data[3], strides[3], i)) *
                        inverse_gap;
        bounded_gradients(n, inverse_gap, *at_stride<float>(data[5], strides[5], i), below, above,
                          at_stride<float>(data[0], strides[0], i), at_stride<float>(data[1], strides[1], i));
      }
    }
    for (int t = 0; t < 6; ++t) {
      data[t] += strides[6 + t];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bounded_forward(const at::Tensor& x, const at::Tensor& lower,
                                                   const at::Tensor& inverse_gap, double levels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && lower.scalar_type() == at::kFloat &&
                  inverse_gap.scalar_type() == at::kFloat,
              "bounded_forward: expected float32 tensors");
  const auto scale = static_cast<float>(levels);
  auto outputs = mbq::elementwise({x, lower, inverse_gap}, 2,
                                  [scale](char** data, const int64_t* strides, int64_t count, int64_t rows) {
                                    bounded_forward_block(data, strides, count, rows, scale);
                                  });
  return {outputs[0], outputs[1]};
}

std::tuple<at::Tensor, at::Tensor> bounded_backward(const at::Tensor& normalized, const at::Tensor& inverse_gap,
                                                    const at::Tensor& grad, double below, double above) {
  TORCH_CHECK(normalized.scalar_type() == at::kFloat && inverse_gap.scalar_type() == at::kFloat &&
                  grad.scalar_type() == at::kFloat,
              "bounded_backward: expected float32 tensors");
  const auto low = static_cast<float>(below);
  const auto high = static_cast<float>(above);
  auto outputs = mbq::elementwise({normalized, inverse_gap, grad}, 2,
                                  [low, high](char** data, const int64_t* strides, int64_t count, int64_t rows) {
                                    bounded_backward_block(data, strides, count, rows, low, high);
                                  });
  return {outputs[0], outputs[1]};
}

at::Tensor bounded_quantized(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& inverse_gap,
                             double levels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && lower.scalar_type() == at::kFloat &&
                  inverse_gap.scalar_type() == at::kFloat,
              "bounded_quantized: expected float32 tensors");
  const auto scale = static_cast<float>(levels);
  return mbq::elementwise({x, lower, inverse_gap}, 1,
                          [scale](char** data, const int64_t* strides, int64_t count, int64_t rows) {
                            bounded_quantized_block(data, strides, count, rows, scale);
                          })[0];
}

std::tuple<at::Tensor, at::Tensor> bounded_backward_from_input(const at::Tensor& x, const at::Tensor& lower,
                                                               const at::Tensor& inverse_gap, const at::Tensor& grad,
                                                               double below, double above) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && lower.scalar_type() == at::kFloat &&
                  inverse_gap.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat,
              "bounded_backward_from_input: expected float32 tensors");
  const auto low = static_cast<float>(below);
  const auto high = static_cast<float>(above);
  auto outputs = mbq::elementwise({x, lower, inverse_gap, grad}, 2,
                                  [low, high](char** data, const int64_t* strides, int64_t count, int64_t rows) {
                                    bounded_backward_from_input_block(data, strides, count, rows, low, high);
                                  });
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbqbench_native, m) {
  // the arguments of methods/quant/kernels.py's formulas, in their order
  m.def("bounded_forward(Tensor x, Tensor lower, Tensor inverse_gap, float levels) -> (Tensor, Tensor)");
  m.def("bounded_backward(Tensor normalized, Tensor inverse_gap, Tensor grad, float below, float above) -> "
        "(Tensor, Tensor)");
  // the node's: q alone, and the backward pass from x
  m.def("bounded_quantized(Tensor x, Tensor lower, Tensor inverse_gap, float levels) -> Tensor");
  m.def("bounded_backward_from_input(Tensor x, Tensor lower, Tensor inverse_gap, Tensor grad, float below, "
        "float above) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mbqbench_native, CPU, m) {
  m.impl("bounded_forward", &bounded_forward);
  m.impl("bounded_backward", &bounded_backward);
  m.impl("bounded_quantized", &bounded_quantized);
  m.impl("bounded_backward_from_input", &bounded_backward_from_input);
}
