// What the weight-list operators share (weight_lists.cpp: DoReFa's weights and the tanh-and-max backward;
// sat_weight_lists.cpp: SAT's): the checks under which an operator takes its inputs, the loops and drivers both
// quantizers' operators run, and the rule they follow for values that are not finite.
// An operator answers an empty list where an input is not a contiguous float32 CPU tensor, so a layout that would
// change the sums' order never reaches a loop, and where a value it reads is not finite: a NaN read from memory has
// a payload, and which of two NaNs an operation passes on is the compiler's choice of operand order (NaNs the
// arithmetic makes from finite values all have the default payload). The caller's list operations then run.
// Defined in an unnamed namespace: each source compiles its own copy (the loops are cloned per instruction set).
#pragma once

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

// [|t| = M] and how many elements are there (the elements the max's gradient is shared among)
MBQ_TARGET_CLONES int64_t at_max_loop(const float* t, uint8_t* at_max, int64_t count, float max_abs) {
  int64_t ties = 0;
  for (int64_t i = 0; i < count; ++i) {
    at_max[i] = static_cast<uint8_t>(std::fabs(t[i]) == max_abs);
    ties += at_max[i];
  }
  return ties;
}

// One output per layer, allocated like `like[i]` and filled by `fill(i, output)`; an empty list as soon as a layer's
// fill declines (the caller's list operations then run for every layer)
template <typename Fill>
TensorList per_layer(const TensorList& like, const Fill& fill) {
  TensorList outputs;
  outputs.reserve(like.size());
  for (size_t i = 0; i < like.size(); ++i) {
    auto out = at::empty_like(like[i]);
    if (!fill(i, out)) {
      return {};
    }
    outputs.push_back(std::move(out));
  }
  return outputs;
}

// The backward heads: per layer the gradient at tanh(w) and the elementwise product whose sum is the gradient at the
// max, both written by `fill(i, head, to_max)`; the sums are ATen's (its summation order)
template <typename Fill>
std::tuple<TensorList, TensorList> backward_heads(const TensorList& grads, const Fill& fill) {
  TensorList sums;
  auto heads = per_layer(grads, [&](size_t i, Tensor& head) {
    auto to_max = at::empty_like(grads[i]);
    if (!fill(i, head, to_max)) {
      return false;
    }
    sums.push_back(at::sum(to_max));
    return true;
  });
  return {heads, heads.empty() ? TensorList{} : sums};
}

// tanh(w) by ATen (its kernel) and max|tanh(w)|, or no tensor where the max is not finite or zero (the terms'
// divisions by it would not be)
std::tuple<Tensor, float> tanh_and_max(const Tensor& weight) {
  if (!contiguous_cpu(weight, at::kFloat) || weight.numel() == 0) {
    return {Tensor(), 0.0f};
  }
  auto squashed = at::tanh(weight);
  const float max_abs = max_abs_loop(squashed.const_data_ptr<float>(), squashed.numel());
  return {usable_max(max_abs) ? squashed : Tensor(), max_abs};
}

// [|t| = M] and how many elements are there, as the list path's bool tensor and int64 count
std::tuple<Tensor, Tensor> ties_of(const Tensor& t, float max_abs) {
  auto at_max = at::empty_like(t, t.options().dtype(at::kBool));
  const auto ties = at_max_loop(t.const_data_ptr<float>(), reinterpret_cast<uint8_t*>(at_max.mutable_data_ptr<bool>()),
                                t.numel(), max_abs);
  return {at_max, at::scalar_tensor(ties, t.options().dtype(at::kLong))};
}

Tensor float_scalar(float value, const Tensor& like) { return at::scalar_tensor(value, like.options()); }

}  // namespace
