// What the CPU kernels of frn (frn_kernel.cpp) and frn_centered (frn_centered_kernel.cpp) share: the
// chunking constants, the TLU's element rules, the backward sums, the eps rounding and the
// parameter-gradient epilogue (their parallel schedules: schedules.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

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

// ---- instruction sets ----------------------------------------------------------------------------
// On x86-64 every task's loops are compiled twice, for AVX2 and for the build's baseline (SSE2), and
// run as AVX2 where the CPU has it and kernel_options().cpu_avx2 allows it (frn.h). The lanes, not the
// vector width, fix every summation order, and -ffp-contract=off (setup.py) keeps FMA out of both (the
// target is avx2, not fma), so both builds give bitwise the same results (the tests compare them).

// Whether the tasks run their AVX2 build now.
bool cpu_avx2_active();

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FRN_DET_CPU_AVX2_BUILD 1
// f() and everything it calls inlined (flatten) into an AVX2 function: its loops are vectorised for
// AVX2 there, and no call leaves AVX2 code for a baseline function mid-task.
template <typename F>
__attribute__((target("avx2"), flatten)) inline auto call_avx2(const F& f) {
  return f();
}
#endif

// Runs f() in the AVX2 build where it is active, else in the baseline build.
template <typename F>
inline auto run_task(const F& f) {
#ifdef FRN_DET_CPU_AVX2_BUILD
  if (cpu_avx2_active()) {
    return call_avx2(f);
  }
#endif
  return f();
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

// ---- the backward sums ---------------------------------------------------------------------------

// Independent partial sums per lane: the lane loops are plain code that the compiler vectorises (a
// single running sum would not be, as FP addition is not associative). The lanes are combined in a
// fixed order, so results do not depend on the build's vector width.
constexpr int kSumLanes = 16;

template <typename acc_t>
inline acc_t lane_sum(const acc_t* s) {
  acc_t r = 0;
  for (int j = 0; j < kSumLanes; ++j) {
    r += s[j];
  }
  return r;
}

// A plane's (or chunk's) backward sums, where y = x_c * a + b and x_c = x (frn) or x - mean (frn_centered).
template <typename acc_t>
struct BwdSums {
  acc_t A = 0; // sum(dy * x_c), dy = g where y passes the TLU
  acc_t B = 0; // sum(dy)
  acc_t T = 0; // sum(g where y < tau)
  void add(const BwdSums& o) {
    A += o.A;
    B += o.B;
    T += o.T;
  }
};

// Adds one element to the backward sums. Single-assignment selects: gcc if-converts and vectorises
// this form only.
template <bool kTLU, typename acc_t>
inline void accumulate(acc_t xc, acc_t gi, acc_t a, acc_t b, acc_t t, acc_t& sA, acc_t& sB, acc_t& sT) {
  const bool pass = passes<kTLU>(xc * a + b, t);
  const acc_t d = pass ? gi : acc_t(0);
  const acc_t e = pass ? acc_t(0) : gi;
  sT += e;
  sA += d * xc;
  sB += d;
}

// The backward sums of a contiguous run of n elements, x_c = centre(x).
template <typename scalar_t, bool kTLU, typename Centre, typename acc_t = typename Acc<scalar_t>::type>
BwdSums<acc_t> backward_sums(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, int64_t n,
                             const Centre& centre, acc_t a, acc_t b, acc_t t) {
  acc_t sA[kSumLanes] = {}, sB[kSumLanes] = {}, sT[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      const acc_t xc = centre(static_cast<acc_t>(x[i + j]));
      accumulate<kTLU>(xc, static_cast<acc_t>(g[i + j]), a, b, t, sA[j], sB[j], sT[j]);
    }
  }
  for (; i < n; ++i) {
    const int j = static_cast<int>(i % kSumLanes);
    const acc_t xc = centre(static_cast<acc_t>(x[i]));
    accumulate<kTLU>(xc, static_cast<acc_t>(g[i]), a, b, t, sA[j], sB[j], sT[j]);
  }
  return {lane_sum(sA), lane_sum(sB), lane_sum(sT)};
}

// ---- what the drivers work on ----------------------------------------------------------------------

template <typename scalar_t>
struct ForwardData {
  using scalar_type = scalar_t;
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x;
  scalar_t* out;
  double* mean; // frn_centered only (centred_mean_type), else null
  acc_t* rstd;
  const acc_t *w, *bias, *tau; // tau null: no TLU
  acc_t eps_eff;
};

template <typename scalar_t>
struct BackwardData {
  using scalar_type = scalar_t;
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t *g, *x;
  scalar_t* dx; // null: no grad_x
  const double* mean; // frn_centered only, else null
  const acc_t *rstd, *w, *bias, *tau;
  acc_t *A, *B, *T; // per-plane sums, (N, C)
};

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

// ---- the op entry points' shared body ----------------------------------------------------------
// drivers(d, tlu): the op's NCHW or NHWC driver for d (ForwardData / BackwardData of the dispatched
// scalar type, its scalar_type) and tlu (std::true_type or std::false_type: the TLU compiled in or out).

// Runs the forward drivers into out and rstd (and mean, frn_centered only: else null).
template <typename F>
void run_forward(const FrnArgs& a, const at::Tensor& out, const at::Tensor* mean, const at::Tensor& rstd,
                 const F& drivers) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_det CPU forward", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const ForwardData<scalar_t> d{
        a.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        mean != nullptr ? mean->mutable_data_ptr<double>() : nullptr, rstd.mutable_data_ptr<acc_t>(),
        a.weight.const_data_ptr<acc_t>(), a.bias.const_data_ptr<acc_t>(),
        a.tau.defined() ? a.tau.const_data_ptr<acc_t>() : nullptr, eps_eff_of<acc_t>(a)};
    with_tlu(d.tau != nullptr, [&](auto tlu) { drivers(d, tlu); });
  });
}

// The backward after its prologue: grad_x (if asked) and the per-plane sums from the drivers, then
// the parameter gradients from the sums.
template <typename F>
BackwardOut run_backward(const FrnArgs& a, const F& drivers) {
  const auto opts = a.x.options().dtype(a.acc);
  at::Tensor grad_x = a.grad_input ? empty_cpu_output(a.x, a.layout) : at::empty({0}, a.x.options());
  at::Tensor A = at::empty({a.N, a.C}, opts);
  at::Tensor B = at::empty({a.N, a.C}, opts);
  at::Tensor T = at::empty({a.N, a.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_det CPU backward", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const BackwardData<scalar_t> d{
        a.grad_out.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
        a.grad_input ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
        a.mean.defined() ? a.mean.const_data_ptr<double>() : nullptr, a.rstd.const_data_ptr<acc_t>(),
        a.weight.const_data_ptr<acc_t>(), a.bias.const_data_ptr<acc_t>(),
        a.tau.defined() ? a.tau.const_data_ptr<acc_t>() : nullptr, A.mutable_data_ptr<acc_t>(),
        B.mutable_data_ptr<acc_t>(), T.mutable_data_ptr<acc_t>()};
    with_tlu(d.tau != nullptr, [&](auto tlu) { drivers(d, tlu); });
  });
  auto [gw, gb, gt, ge] = param_grads_cpu(a, A, B, T);
  return {grad_x, gw, gb, gt, ge};
}

} // namespace cpu
} // namespace frn_det
