// CPU kernels of torch.ops.frn_det.frn / frn_backward: per (sample, channel) plane,
// nu2 = mean(x^2), y = x * rsqrt(nu2 + eps + |eps_l|) * weight + bias, out = max(y, tau).
//
// The parallel schedules, shared with frn_centered (schedules.h): NCHW one task per plane (sum of squares,
// then normalise + affine + TLU while the plane is still in L2), or, with fewer planes than threads,
// chunks of planes in parallel; NHWC (channels_last) blocks of rows of one sample, whose per-channel
// loops vectorise. Sums always run over fixed chunks of a plane in the same order, so results do not
// depend on the thread count or on which NCHW path ran (NHWC sums in another order: results agree
// to rounding).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/schedules.h"
#include "frn.h"

namespace frn_det {
namespace cpu {
namespace {

template <typename acc_t>
inline acc_t rstd_from(acc_t sumsq, int64_t L, acc_t eps_eff) {
  const acc_t nu2 = L > 0 ? sumsq / static_cast<acc_t>(L) : acc_t(0);
  return acc_t(1) / std::sqrt(nu2 + eps_eff);
}

// ---- contiguous runs (NCHW planes or chunks of them) ------------------------------------------

template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
acc_t sum_squares(const scalar_t* __restrict__ x, int64_t n) {
  acc_t s[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      s[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s[i % kSumLanes] += v * v;
  }
  return lane_sum(s);
}

// out = tlu(x * a + b, t).
template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
void forward_apply(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, acc_t a, acc_t b, acc_t t) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(tlu<kTLU>(static_cast<acc_t>(x[i]) * a + b, t));
  }
}

// frn's x_c is x itself (a type, not a function pointer, so that backward_sums inlines it).
struct Uncentred {
  template <typename acc_t>
  acc_t operator()(acc_t xi) const {
    return xi;
  }
};

// dx = ca * dy + cx * x with ca = gamma * rstd, cx = -gamma * rstd^3 * A / L.
template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
void backward_apply(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, int64_t n,
    acc_t a, acc_t b, acc_t t, acc_t ca, acc_t cx) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t gi = static_cast<acc_t>(g[i]);
    const acc_t d = passes<kTLU>(xi * a + b, t) ? gi : acc_t(0);
    dx[i] = static_cast<scalar_t>(d * ca + xi * cx);
  }
}

// cx of dx = ca * dy + cx * x for a plane of L elements.
template <typename acc_t>
inline acc_t cx_of(acc_t w, acc_t r, acc_t A, int64_t L) {
  return L > 0 ? -w * r * r * r * A / static_cast<acc_t>(L) : acc_t(0);
}

// ---- drivers: the work of each run, in the schedules of schedules.h --------------------------

template <typename scalar_t, bool kTLU>
void forward_nchw(const ForwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, unused_mean, rstd, w, bias, tau, eps_eff] = d;
  schedule_planes<acc_t>(
      P, L, 1, true, [&](int64_t, int64_t off, int64_t n) { return sum_squares(x + off, n); },
      [](acc_t& ss, acc_t part) { ss += part; }, [&](int64_t p, acc_t ss) { rstd[p] = rstd_from(ss, L, eps_eff); },
      [&](int64_t p, int64_t off, int64_t n) {
        const int64_t c = p % C;
        forward_apply<scalar_t, kTLU>(x + off, out + off, n, w[c] * rstd[p], bias[c], kTLU ? tau[c] : acc_t(0));
      });
}

template <typename scalar_t, bool kTLU>
void backward_nchw(const BackwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, unused_mean, rstd, w, bias, tau, A, B, T] = d;
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  schedule_plane_sums(
      P, L, dx != nullptr, A, B, T,
      [&](int64_t p, int64_t off, int64_t n) {
        const int64_t c = p % C;
        return backward_sums<scalar_t, kTLU>(g + off, x + off, n, Uncentred{}, w[c] * rstd[p], bias[c], t_of(c));
      },
      [&](int64_t p, int64_t off, int64_t n) {
        const int64_t c = p % C;
        const acc_t a = w[c] * rstd[p];
        backward_apply<scalar_t, kTLU>(g + off, x + off, dx + off, n, a, bias[c], t_of(c), a, cx_of(w[c], rstd[p], A[p], L));
      });
}

// NHWC (channels_last): sample n is an (L, C) row-major matrix; every row is C contiguous channels,
// so the per-channel loops vectorise.

template <typename scalar_t, bool kTLU>
void forward_nhwc(const ForwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, unused_mean, rstd, w, bias, tau, eps_eff] = d;
  std::vector<acc_t> scale(N * C); // gamma * rstd
  schedule_samples<acc_t>(
      N, C, L, 1, 1, true,
      // s[c] += x^2 over rows [l0, l1) of sample n.
      [&](int64_t n, int64_t l0, int64_t l1, acc_t* __restrict__ s) {
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* __restrict__ xr = x + (n * L + l) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(xr[c]);
            s[c] += v * v;
          }
        }
      },
      [&](acc_t* into, int64_t, const acc_t* part, int64_t) {
        for (int64_t c = 0; c < C; ++c) {
          into[c] += part[c];
        }
      },
      [&](int64_t n, const acc_t* ss) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t r = rstd_from(ss[c], L, eps_eff);
          rstd[n * C + c] = r;
          scale[n * C + c] = w[c] * r;
        }
      },
      // out = TLU(x * scale[c] + bias[c]) over rows [l0, l1) of sample n.
      [&](int64_t n, int64_t l0, int64_t l1) {
        const acc_t* __restrict__ a = scale.data() + n * C;
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* __restrict__ xr = x + (n * L + l) * C;
          scalar_t* __restrict__ orow = out + (n * L + l) * C;
          for (int64_t c = 0; c < C; ++c) {
            orow[c] = static_cast<scalar_t>(tlu<kTLU>(static_cast<acc_t>(xr[c]) * a[c] + bias[c], kTLU ? tau[c] : acc_t(0)));
          }
        }
      });
}

template <typename scalar_t, bool kTLU>
void backward_nhwc(const BackwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, unused_mean, rstd, w, bias, tau, A, B, T] = d;
  std::vector<acc_t> scale(N * C); // gamma * rstd
  for (int64_t i = 0; i < N * C; ++i) {
    scale[i] = w[i % C] * rstd[i];
  }
  std::vector<acc_t> cx(N * C); // -gamma * rstd^3 * A / L
  schedule_sample_sums(
      N, C, L, dx != nullptr, A, B, T,
      // The per-channel sums A, B, T over rows [l0, l1) of sample n, into s, s + C, s + 2 C.
      [&](int64_t n, int64_t l0, int64_t l1, acc_t* __restrict__ s) {
        const acc_t* __restrict__ a = scale.data() + n * C;
        acc_t* __restrict__ sA = s;
        acc_t* __restrict__ sB = s + C;
        acc_t* __restrict__ sT = s + 2 * C;
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* __restrict__ xr = x + (n * L + l) * C;
          const scalar_t* __restrict__ gr = g + (n * L + l) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xi = static_cast<acc_t>(xr[c]);
            const acc_t gi = static_cast<acc_t>(gr[c]);
            accumulate<kTLU>(xi, gi, a[c], bias[c], kTLU ? tau[c] : acc_t(0), sA[c], sB[c], sT[c]);
          }
        }
      },
      [&](int64_t n) {
        for (int64_t c = 0; c < C; ++c) {
          cx[n * C + c] = cx_of(w[c], rstd[n * C + c], A[n * C + c], L);
        }
      },
      // dx = a * dy + cx * x over rows [l0, l1) of sample n.
      [&](int64_t n, int64_t l0, int64_t l1) {
        const acc_t* __restrict__ a = scale.data() + n * C;
        const acc_t* __restrict__ cxn = cx.data() + n * C;
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* __restrict__ xr = x + (n * L + l) * C;
          const scalar_t* __restrict__ gr = g + (n * L + l) * C;
          scalar_t* __restrict__ dr = dx + (n * L + l) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xi = static_cast<acc_t>(xr[c]);
            const acc_t gi = static_cast<acc_t>(gr[c]);
            const acc_t d = passes<kTLU>(xi * a[c] + bias[c], kTLU ? tau[c] : acc_t(0)) ? gi : acc_t(0);
            dr[c] = static_cast<scalar_t>(d * a[c] + xi * cxn[c]);
          }
        }
      });
}

// ---- op implementations -----------------------------------------------------------------------

ForwardOut frn_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const std::optional<at::Tensor>& tau, double eps, const std::optional<at::Tensor>& eps_l) {
  const FrnArgs a = prepare_forward(x, weight, bias, tau, eps, eps_l);
  TORCH_INTERNAL_ASSERT(a.x.device().is_cpu());
  at::Tensor out = empty_cpu_output(a.x, a.layout);
  at::Tensor rstd = at::empty({a.N, a.C}, a.x.options().dtype(a.acc));
  run_forward(a, out, nullptr, rstd, [&](const auto& d, auto tlu) {
    using scalar_t = typename std::decay_t<decltype(d)>::scalar_type;
    constexpr bool kTLU = decltype(tlu)::value;
    a.layout == Layout::NHWC ? forward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                             : forward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
  });
  return {out, rstd};
}

} // namespace

// The CPU parameter-gradient epilogue: batch sums of the per-plane sums A = sum(dy * x),
// B = sum(dy), T = sum(g where y < tau) ((N, C), accumulation dtype), in plain loops. ATen
// reductions here would each open a parallel region for a few thousand values, which costs more
// than the work (and much more on a loaded machine, where every region waits for all threads).
ParamGrads param_grads_cpu(const FrnArgs& a, const at::Tensor& A, const at::Tensor& B, const at::Tensor& T) {
  const int64_t N = a.N, C = a.C;
  const auto opts = a.x.options().dtype(a.acc);
  at::Tensor gw = at::empty({C}, opts);
  at::Tensor gb = at::empty({C}, opts);
  at::Tensor gt = at::empty({C}, opts);
  at::Tensor ge = at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES(a.acc, "frn_backward_cpu_params", [&] {
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    const scalar_t* Bp = B.const_data_ptr<scalar_t>();
    const scalar_t* Tp = T.const_data_ptr<scalar_t>();
    const scalar_t* rp = a.rstd.const_data_ptr<scalar_t>();
    const scalar_t* wp = a.weight.const_data_ptr<scalar_t>();
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
    scalar_t* gtp = gt.mutable_data_ptr<scalar_t>();
    std::fill(gwp, gwp + C, scalar_t(0));
    std::fill(gbp, gbp + C, scalar_t(0));
    std::fill(gtp, gtp + C, scalar_t(0));
    scalar_t d_eps_eff = 0; // sum over planes of -0.5 * gamma * A * rstd^3
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        // A == 0 (an empty plane, or no gradient): no contribution, also where rstd is inf (eps 0)
        const scalar_t ar = Ap[p] == scalar_t(0) ? scalar_t(0) : Ap[p] * rp[p];
        gwp[c] += ar; // dL/dgamma = sum dy * x_hat = sum_n A * rstd
        gbp[c] += Bp[p];
        gtp[c] += Tp[p];
        d_eps_eff += scalar_t(-0.5) * wp[c] * ar * rp[p] * rp[p];
      }
    }
    // eps_eff = eps + |eps_l|: d/d(eps_l) = sign(eps_l), 0 at 0 like autograd's abs.
    const double e = a.eps_l.defined() ? a.eps_l.item().toDouble() : 0.0;
    const scalar_t sign = e > 0 ? scalar_t(1) : (e < 0 ? scalar_t(-1) : scalar_t(0));
    ge.mutable_data_ptr<scalar_t>()[0] = d_eps_eff * sign;
  });
  return to_param_dtypes(a, gw, gb, gt, ge);
}

namespace {

BackwardOut frn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias, const std::optional<at::Tensor>& tau, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& eps_l, bool grad_input) {
  const FrnArgs a = prepare_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input);
  TORCH_INTERNAL_ASSERT(a.x.device().is_cpu());
  return run_backward(a, [&](const auto& d, auto tlu) {
    using scalar_t = typename std::decay_t<decltype(d)>::scalar_type;
    constexpr bool kTLU = decltype(tlu)::value;
    a.layout == Layout::NHWC ? backward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                             : backward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
  });
}

// The path both ops' drivers take for x at the current thread count (the tests ask, to know that
// the path they test ran): "planes" or "split" (NCHW), "samples" or "rows" (channels_last).
std::string cpu_plan(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "_cpu_plan: x must be 4D (N, C, H, W), got ", x.dim(), "D");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  if (layout_of(x) == Layout::NHWC) {
    return fuses_samples(L, C) ? "samples" : "rows";
  }
  return splits_planes(N * C, L) ? "split" : "planes";
}

} // namespace

bool cpu_avx2_active() {
#ifdef FRN_DET_CPU_AVX2_BUILD
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  return has_avx2 && kernel_options().cpu_avx2.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

} // namespace cpu

std::string cpu_isa() {
  return cpu::cpu_avx2_active() ? "avx2" : "baseline";
}

} // namespace frn_det

// This backend's kernels for the ops defined in frn.cpp.
TORCH_LIBRARY_IMPL(frn_det, CPU, m) {
  m.impl("frn", TORCH_FN(frn_det::cpu::frn_forward_cpu));
  m.impl("frn_backward", TORCH_FN(frn_det::cpu::frn_backward_cpu));
  m.impl("_cpu_plan", TORCH_FN(frn_det::cpu::cpu_plan));
}
