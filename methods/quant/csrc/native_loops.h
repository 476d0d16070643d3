// What the native quantizer loops share (clamp_round_unit.cpp, pact.cpp, bounded.cpp): ATen's clamp on one float,
// the per-instruction-set cloning of the hot loops, and running a loop over TensorIterator's blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>

#include <cmath>
#include <initializer_list>
#include <vector>

// One vector loop per instruction set, picked when the library is loaded (GCC and clang on x86-64).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MBQ_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MBQ_TARGET_CLONES
#endif

namespace mbq {

constexpr int64_t kFloat = sizeof(float);

// ATen's clamp with scalar bounds (low <= high): a NaN passes through, and std::max(v, low) keeps v on a tie, so
// -0.0 stays -0.0 at a bound of 0, as ATen's keeps it.
inline float aten_clamp(float value, float low, float high) {
  return std::isnan(value) ? value : std::min(std::max(value, low), high);
}

template <typename T>
T* at_stride(char* base, int64_t stride, int64_t i) {
  return reinterpret_cast<T*>(base + i * stride);
}

// `loop` (TensorIterator's 1-d or 2-d loop) over `inputs`, into `outputs` fresh float tensors laid out as
// TensorIterator lays out an elementwise result (the inputs' layout when they are dense); returns the outputs.
// TensorIterator parallelises inside libtorch, so the loops need no OpenMP of their own.
template <typename Loop>
std::vector<at::Tensor> elementwise(std::initializer_list<at::Tensor> inputs, size_t outputs, const Loop& loop) {
  std::vector<at::Tensor> results(outputs);
  at::TensorIteratorConfig config;
  for (auto& result : results) {
    config.add_output(result);
  }
  for (const auto& input : inputs) {
    config.add_const_input(input);
  }
  auto iter = config.build();
  iter.for_each(loop);
  for (size_t i = 0; i < outputs; ++i) {
    results[i] = iter.output(static_cast<int64_t>(i));
  }
  return results;
}

}  // namespace mbq
