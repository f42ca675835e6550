// CPU kernels of torch.ops.frn_det.frn / frn_backward.
//
// NCHW: one task per plane (sum of squares, then normalise + affine + TLU while the plane is still
// in L2). When there are fewer planes than threads, planes are split into chunks and the two
// phases run as separate parallel loops. NHWC (channels_last): tasks are blocks of rows of one
// sample; every row is C contiguous channels, so the per-channel loops vectorise.
// Sums always run over fixed chunks of a plane in the same order, so results do not depend on the
// thread count or on which NCHW path ran (NHWC sums in another order: results agree to rounding).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/cpu_common.h"
#include "frn.h"

namespace frn_det {
namespace cpu {
namespace {

// Independent partial sums per lane: the lane loops below are plain code that the compiler
// vectorises (a single running sum would not be, as FP addition is not associative). The lanes
// are combined in a fixed order, so results do not depend on the build's vector width.
constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t rstd_from(acc_t sumsq, int64_t L, acc_t eps_eff) {
  const acc_t nu2 = L > 0 ? sumsq / static_cast<acc_t>(L) : acc_t(0);
  return acc_t(1) / std::sqrt(nu2 + eps_eff);
}

template <typename acc_t>
inline acc_t lane_sum(const acc_t* s) {
  acc_t r = 0;
  for (int j = 0; j < kLanes; ++j) {
    r += s[j];
  }
  return r;
}

// Adds one element to the backward sums A = sum(dy * x), B = sum(dy), T = sum(g where y < tau),
// dy = g where y passes. Single-assignment selects: gcc if-converts and vectorises this form only.
template <bool kTLU, typename acc_t>
inline void accumulate(acc_t xi, acc_t gi, acc_t a, acc_t b, acc_t t, acc_t& sA, acc_t& sB, acc_t& sT) {
  const bool pass = passes<kTLU>(xi * a + b, t);
  const acc_t d = pass ? gi : acc_t(0);
  const acc_t e = pass ? acc_t(0) : gi;
  sT += e;
  sA += d * xi;
  sB += d;
}

// ---- contiguous runs (NCHW planes or chunks of them) ------------------------------------------

template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
acc_t sum_squares(const scalar_t* __restrict__ x, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      s[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s[i % kLanes] += v * v;
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

template <typename acc_t>
struct BwdSums {
  acc_t A = 0; // sum(dy * x), dy = g where y >= tau
  acc_t B = 0; // sum(dy)
  acc_t T = 0; // sum(g where y < tau)
  void add(const BwdSums& o) {
    A += o.A;
    B += o.B;
    T += o.T;
  }
};

template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
BwdSums<acc_t> backward_sums(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, int64_t n, acc_t a, acc_t b, acc_t t) {
  acc_t sA[kLanes] = {}, sB[kLanes] = {}, sT[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t xi = static_cast<acc_t>(x[i + j]);
      const acc_t gi = static_cast<acc_t>(g[i + j]);
      accumulate<kTLU>(xi, gi, a, b, t, sA[j], sB[j], sT[j]);
    }
  }
  for (; i < n; ++i) {
    const int j = static_cast<int>(i % kLanes);
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t gi = static_cast<acc_t>(g[i]);
    accumulate<kTLU>(xi, gi, a, b, t, sA[j], sB[j], sT[j]);
  }
  BwdSums<acc_t> s;
  s.A = lane_sum(sA);
  s.B = lane_sum(sB);
  s.T = lane_sum(sT);
  return s;
}

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

// ---- drivers: the data each one works on -------------------------------------------------------

template <typename scalar_t>
struct ForwardData {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x;
  scalar_t* out;
  acc_t* rstd;
  const acc_t *w, *bias, *tau; // tau null: no TLU
  acc_t eps_eff;
};

template <typename scalar_t>
struct BackwardData {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t *g, *x;
  scalar_t* dx; // null: no grad_x
  const acc_t *rstd, *w, *bias, *tau;
  acc_t *A, *B, *T; // per-plane sums, (N, C)
};

// ---- NCHW drivers ---------------------------------------------------------------------------

template <typename scalar_t, bool kTLU>
void forward_nchw(const ForwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, rstd, w, bias, tau, eps_eff] = d;
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  if (!splits_planes(P, L)) {
    // Fused: the plane is read from memory once and re-read from cache.
    at::parallel_for(0, P, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* xp = x + p * L;
        acc_t ss = 0;
        for (int64_t k = 0; k < K; ++k) {
          ss += sum_squares(xp + k * kChunk, chunk_len(k));
        }
        const acc_t r = rstd_from(ss, L, eps_eff);
        rstd[p] = r;
        const int64_t c = p % C;
        forward_apply<scalar_t, kTLU>(xp, out + p * L, L, w[c] * r, bias[c], t_of(c));
      }
    });
    return;
  }
  // Few large planes: split each plane into chunks so that every thread has work.
  std::vector<acc_t> part(P * K);
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u / K, k = u % K;
      part[u] = sum_squares(x + p * L + k * kChunk, chunk_len(k));
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    acc_t ss = 0;
    for (int64_t k = 0; k < K; ++k) {
      ss += part[p * K + k];
    }
    rstd[p] = rstd_from(ss, L, eps_eff);
  }
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u / K, k = u % K, c = p % C;
      const int64_t off = p * L + k * kChunk;
      forward_apply<scalar_t, kTLU>(x + off, out + off, chunk_len(k), w[c] * rstd[p], bias[c], t_of(c));
    }
  });
}

template <typename scalar_t, bool kTLU>
void backward_nchw(const BackwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, rstd, w, bias, tau, A, B, T] = d;
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  // dx = ca * dy + cx * x; cx needs the whole plane's A.
  auto cx_of = [&](int64_t p, int64_t c) {
    const acc_t r = rstd[p];
    return L > 0 ? -w[c] * r * r * r * A[p] / static_cast<acc_t>(L) : acc_t(0);
  };
  if (!splits_planes(P, L)) {
    at::parallel_for(0, P, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(2 * L, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const acc_t a = w[c] * rstd[p];
        BwdSums<acc_t> s;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t off = p * L + k * kChunk;
          s.add(backward_sums<scalar_t, kTLU>(g + off, x + off, chunk_len(k), a, bias[c], t_of(c)));
        }
        A[p] = s.A;
        B[p] = s.B;
        T[p] = s.T;
        if (dx != nullptr) {
          backward_apply<scalar_t, kTLU>(g + p * L, x + p * L, dx + p * L, L, a, bias[c], t_of(c), a, cx_of(p, c));
        }
      }
    });
    return;
  }
  std::vector<BwdSums<acc_t>> part(P * K);
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u / K, k = u % K, c = p % C;
      const int64_t off = p * L + k * kChunk;
      part[u] = backward_sums<scalar_t, kTLU>(g + off, x + off, chunk_len(k), w[c] * rstd[p], bias[c], t_of(c));
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    BwdSums<acc_t> s;
    for (int64_t k = 0; k < K; ++k) {
      s.add(part[p * K + k]);
    }
    A[p] = s.A;
    B[p] = s.B;
    T[p] = s.T;
  }
  if (dx == nullptr) {
    return;
  }
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u / K, k = u % K, c = p % C;
      const int64_t off = p * L + k * kChunk;
      const acc_t a = w[c] * rstd[p];
      backward_apply<scalar_t, kTLU>(g + off, x + off, dx + off, chunk_len(k), a, bias[c], t_of(c), a, cx_of(p, c));
    }
  });
}

// ---- NHWC (channels_last) drivers -------------------------------------------------------------
// Sample n is an (L, C) row-major matrix. A sample of at most kSampleFuse elements is one task:
// statistics, then the output, while the sample is in cache. Larger samples are split into tasks
// of (n, block of rows); per-channel partial sums of each task go to their own slice of a buffer
// and are combined in task order.

template <typename scalar_t, bool kTLU>
void forward_nhwc(const ForwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, rstd, w, bias, tau, eps_eff] = d;
  // s[c] += x^2 over rows [l0, l1) of sample n.
  auto stats_rows = [&](int64_t n, int64_t l0, int64_t l1, acc_t* __restrict__ s) {
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* __restrict__ xr = x + (n * L + l) * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(xr[c]);
        s[c] += v * v;
      }
    }
  };
  // out = TLU(x * a[c] + bias[c]) over rows [l0, l1) of sample n.
  auto apply_rows = [&](int64_t n, int64_t l0, int64_t l1, const acc_t* __restrict__ a) {
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* __restrict__ xr = x + (n * L + l) * C;
      scalar_t* __restrict__ orow = out + (n * L + l) * C;
      for (int64_t c = 0; c < C; ++c) {
        orow[c] = static_cast<scalar_t>(tlu<kTLU>(static_cast<acc_t>(xr[c]) * a[c] + bias[c], kTLU ? tau[c] : acc_t(0)));
      }
    }
  };
  if (fuses_samples(L, C)) {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(L * C, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(C), a(C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(s.begin(), s.end(), acc_t(0));
        stats_rows(n, 0, L, s.data());
        for (int64_t c = 0; c < C; ++c) {
          const acc_t r = rstd_from(s[c], L, eps_eff);
          rstd[n * C + c] = r;
          a[c] = w[c] * r;
        }
        apply_rows(n, 0, L, a.data());
      }
    });
    return;
  }
  const int64_t R = std::max<int64_t>(1, kChunk / C); // rows per task
  const int64_t K = divup(L, R);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (R * C));
  std::vector<acc_t> part(N * K * C);
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      acc_t* s = part.data() + u * C;
      std::fill(s, s + C, acc_t(0));
      stats_rows(n, k * R, std::min(L, (k + 1) * R), s);
    }
  });
  // Combined serially (N * K * C additions, a fraction of the data): a parallel region here costs
  // more than it saves.
  std::vector<acc_t> scale(N * C);
  std::vector<acc_t> ss(C);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(ss.begin(), ss.end(), acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* s = part.data() + (n * K + k) * C;
      for (int64_t c = 0; c < C; ++c) {
        ss[c] += s[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const acc_t r = rstd_from(ss[c], L, eps_eff);
      rstd[n * C + c] = r;
      scale[n * C + c] = w[c] * r;
    }
  }
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      apply_rows(n, k * R, std::min(L, (k + 1) * R), scale.data() + n * C);
    }
  });
}

template <typename scalar_t, bool kTLU>
void backward_nhwc(const BackwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, rstd, w, bias, tau, A, B, T] = d;
  std::vector<acc_t> scale(N * C); // gamma * rstd
  for (int64_t i = 0; i < N * C; ++i) {
    scale[i] = w[i % C] * rstd[i];
  }
  // sA/sB/sT[c] += the per-channel sums over rows [l0, l1) of sample n.
  auto sums_rows = [&](int64_t n, int64_t l0, int64_t l1, acc_t* __restrict__ sA, acc_t* __restrict__ sB,
                       acc_t* __restrict__ sT) {
    const acc_t* __restrict__ a = scale.data() + n * C;
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* __restrict__ xr = x + (n * L + l) * C;
      const scalar_t* __restrict__ gr = g + (n * L + l) * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xi = static_cast<acc_t>(xr[c]);
        const acc_t gi = static_cast<acc_t>(gr[c]);
        accumulate<kTLU>(xi, gi, a[c], bias[c], kTLU ? tau[c] : acc_t(0), sA[c], sB[c], sT[c]);
      }
    }
  };
  // dx = a * dy + cx * x over rows [l0, l1) of sample n.
  auto apply_rows = [&](int64_t n, int64_t l0, int64_t l1, const acc_t* __restrict__ cxn) {
    const acc_t* __restrict__ a = scale.data() + n * C;
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
  };
  std::vector<acc_t> cx(N * C); // -gamma * rstd^3 * A / L
  auto finish_sample = [&](int64_t n) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t r = rstd[n * C + c];
      cx[n * C + c] = L > 0 ? -w[c] * r * r * r * A[n * C + c] / static_cast<acc_t>(L) : acc_t(0);
    }
  };
  auto zero_sums = [&](int64_t n) {
    std::fill(A + n * C, A + (n + 1) * C, acc_t(0));
    std::fill(B + n * C, B + (n + 1) * C, acc_t(0));
    std::fill(T + n * C, T + (n + 1) * C, acc_t(0));
  };
  if (fuses_samples(L, C)) {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(2 * L * C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        zero_sums(n);
        sums_rows(n, 0, L, A + n * C, B + n * C, T + n * C);
        finish_sample(n);
        if (dx != nullptr) {
          apply_rows(n, 0, L, cx.data() + n * C);
        }
      }
    });
    return;
  }
  const int64_t R = std::max<int64_t>(1, kChunk / C);
  const int64_t K = divup(L, R);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (2 * R * C));
  // part[u] holds A, B, T for C channels: 3 * C values per task.
  std::vector<acc_t> part(N * K * 3 * C);
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      acc_t* sA = part.data() + u * 3 * C;
      std::fill(sA, sA + 3 * C, acc_t(0));
      sums_rows(n, k * R, std::min(L, (k + 1) * R), sA, sA + C, sA + 2 * C);
    }
  });
  // Combined serially, see forward_nhwc.
  for (int64_t n = 0; n < N; ++n) {
    zero_sums(n);
    acc_t* An = A + n * C;
    acc_t* Bn = B + n * C;
    acc_t* Tn = T + n * C;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* s = part.data() + (n * K + k) * 3 * C;
      for (int64_t c = 0; c < C; ++c) {
        An[c] += s[c];
        Bn[c] += s[C + c];
        Tn[c] += s[2 * C + c];
      }
    }
    finish_sample(n);
  }
  if (dx == nullptr) {
    return;
  }
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      apply_rows(n, k * R, std::min(L, (k + 1) * R), cx.data() + n * C);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_forward_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const ForwardData<scalar_t> d{
        a.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>(),
        a.weight.const_data_ptr<acc_t>(), a.bias.const_data_ptr<acc_t>(),
        a.tau.defined() ? a.tau.const_data_ptr<acc_t>() : nullptr, eps_eff_of<acc_t>(a)};
    with_tlu(d.tau != nullptr, [&](auto tlu) {
      constexpr bool kTLU = decltype(tlu)::value;
      a.layout == Layout::NHWC ? forward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                               : forward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
    });
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
  const auto opts = a.x.options().dtype(a.acc);
  at::Tensor grad_x = a.grad_input ? empty_cpu_output(a.x, a.layout) : at::empty({0}, a.x.options());
  at::Tensor A = at::empty({a.N, a.C}, opts);
  at::Tensor B = at::empty({a.N, a.C}, opts);
  at::Tensor T = at::empty({a.N, a.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_backward_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const BackwardData<scalar_t> d{
        a.grad_out.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
        a.grad_input ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, a.rstd.const_data_ptr<acc_t>(),
        a.weight.const_data_ptr<acc_t>(), a.bias.const_data_ptr<acc_t>(),
        a.tau.defined() ? a.tau.const_data_ptr<acc_t>() : nullptr, A.mutable_data_ptr<acc_t>(),
        B.mutable_data_ptr<acc_t>(), T.mutable_data_ptr<acc_t>()};
    with_tlu(d.tau != nullptr, [&](auto tlu) {
      constexpr bool kTLU = decltype(tlu)::value;
      a.layout == Layout::NHWC ? backward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                               : backward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
    });
  });
  auto [gw, gb, gt, ge] = param_grads_cpu(a, A, B, T);
  return {grad_x, gw, gb, gt, ge};
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
} // namespace cpu
} // namespace frn_det

// This backend's kernels for the ops defined in frn.cpp.
TORCH_LIBRARY_IMPL(frn_det, CPU, m) {
  m.impl("frn", TORCH_FN(frn_det::cpu::frn_forward_cpu));
  m.impl("frn_backward", TORCH_FN(frn_det::cpu::frn_backward_cpu));
  m.impl("_cpu_plan", TORCH_FN(frn_det::cpu::cpu_plan));
}
