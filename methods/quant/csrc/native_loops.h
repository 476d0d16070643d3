// What the native quantizer loops share (clamp_round_unit.cpp, pact.cpp, bounded.cpp, bounded_node.cpp): ATen's
// clamp on one float, the per-instruction-set cloning of the hot loops, running a loop over TensorIterator's blocks,
// and what the C++ autograd nodes share: the checks under which a loop gives the eager passes' bits and layout, and
// calling an operator through the dispatcher.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

// contiguous or channels_last: the layouts whose elementwise results TensorIterator writes in the input's layout
inline bool dense(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// CompiledKernel.run_like's checks (methods/quant/kernels.py) for a loop over a dense x: at least `min_elements`
// elements, no graph being recorded (a double backward takes the eager passes), every other operand of x's dtype
// and, if of x's shape, of its layout (an upstream gradient in another layout changes what the eager passes write)
inline bool loop_runs(const at::Tensor& x, std::initializer_list<at::Tensor> others, int64_t min_elements = 0) {
  if (at::GradMode::is_enabled() || x.numel() < min_elements || !dense(x)) {
    return false;
  }
  for (const auto& t : others) {
    if (t.scalar_type() != x.scalar_type() || (t.sizes() == x.sizes() && t.strides() != x.strides())) {
      return false;
    }
  }
  return true;
}

// whether every output of a loop is in x's layout (else the node takes the eager passes, as run_like does)
inline bool in_layout_of(const at::Tensor& x, std::initializer_list<at::Tensor> outputs) {
  for (const auto& t : outputs) {
    if (t.strides() != x.strides()) {
      return false;
    }
  }
  return true;
}

// an mbqbench_native operator's handle: a call through the dispatcher, which a profile names
template <typename Signature>
c10::TypedOperatorHandle<Signature> operator_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace mbq
