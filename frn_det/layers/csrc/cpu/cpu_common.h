// What the CPU kernels of frn (frn_kernel.cpp) and frn_centered (frn_centered_kernel.cpp) share: the
// chunking constants, the TLU's element rules, the eps rounding and the parameter-gradient epilogue.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "frn.h"

namespace frn_det {
namespace cpu {

// Elements per chunk of a plane: the unit of summation order and of intra-plane parallelism.
constexpr int64_t kChunk = 4096;
// Below this many elements per task, parallel_for stays on one thread.
constexpr int64_t kGrainElems = 32768;
// NHWC (channels_last): a sample of at most this many elements is one task.
constexpr int64_t kSampleFuse = 32768;

inline int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The drivers' choice of path, one rule for both ops (and _cpu_plan, which the tests ask):
// NCHW planes are split into chunks across threads when there are fewer planes (P) than threads
// and a plane (L elements) has more than one chunk; otherwise each plane is one task.
inline bool splits_planes(int64_t P, int64_t L) {
  return P < at::get_num_threads() && divup(L, kChunk) > 1;
}
// An NHWC sample (L x C elements) is one task up to kSampleFuse elements, else split into row blocks.
inline bool fuses_samples(int64_t L, int64_t C) {
  return L * C <= kSampleFuse;
}

// ---- the element-wise math ---------------------------------------------------------------------
// y = x * a + b is computed without FMA contraction (setup.py passes -ffp-contract=off), so the TLU
// mask that backward recomputes agrees with forward bit for bit, also at ties.

// Whether the gradient at y goes to y (else to tau): not below t; ties and NaN go to y.
template <bool kTLU, typename acc_t>
inline bool passes(acc_t y, acc_t t) {
  return !kTLU || !(y < t);
}

// The TLU max(y, t): ties keep y, and a NaN y stays NaN (as through torch.maximum).
template <bool kTLU, typename acc_t>
inline acc_t tlu(acc_t y, acc_t t) {
  return passes<kTLU>(y, t) ? y : t;
}

// Calls f(std::true_type) or f(std::false_type): the drivers are compiled with and without the TLU.
template <typename F>
void with_tlu(bool tlu, F&& f) {
  tlu ? f(std::true_type{}) : f(std::false_type{});
}

// eps + |eps_l| rounded in the accumulation type, as the CUDA kernels and the reference compute it.
template <typename acc_t>
acc_t eps_eff_of(const FrnArgs& a) {
  const acc_t eps = static_cast<acc_t>(a.eps);
  return a.eps_l.defined() ? eps + std::abs(a.eps_l.item<acc_t>()) : eps;
}

// The parameter-gradient epilogue (frn_kernel.cpp) from the per-plane sums A = sum(dy * x_c),
// B = sum(dy), T = sum(g where y < tau), (N, C) in the accumulation dtype, where x_c = x for frn and
// x - mean for frn_centered: in both, x_hat = x_c * rstd, so dweight = sum A * rstd and
// d(eps_eff) = sum -0.5 * weight * A * rstd^3.
ParamGrads param_grads_cpu(const FrnArgs& a, const at::Tensor& A, const at::Tensor& B, const at::Tensor& T);

} // namespace cpu
} // namespace frn_det
