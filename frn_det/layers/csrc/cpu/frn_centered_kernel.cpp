// CPU kernels of torch.ops.frn_det.frn_centered / frn_centered_backward: FRN's centred variant,
// per (sample, channel) plane
//   m = mean(x), v = mean((x - m)^2), rstd = 1 / sqrt(v + eps + |eps_l|),
//   y = (x - m) * rstd * weight + bias, out = TLU(y) = max(y, tau).
//
// Statistics: one read of the plane. Welford's update per lane (kLanes lanes over each chunk of
// kChunk elements, so no run is longer than kChunk / kLanes values), Chan's combination of the
// lanes (a fixed pairwise tree) and then of the chunks in order: results are bitwise the same run to run, on any
// thread count and on either NCHW path (fused per plane, or split into chunks when there are fewer
// planes than threads). The values are shifted by the plane's first element s before Welford
// (x - s is exact where x is within a factor 2 of s), so the mean is m = s + mean(x - s) to the
// precision of the spread, not of the mean's magnitude. That mean is stored as float64 and used as
// hi + lo in the accumulation type (centre_of): x - m = (x - hi) - lo. A constant plane (and so a
// 1x1 plane) has x - s = 0 everywhere: m = s exactly, v = 0, and the output is exactly bias.
//
// NHWC (channels_last): tasks are blocks of rows of one sample, as in frn_kernel.cpp, with
// per-channel Welford runs of at most kRun rows combined in order (results agree with NCHW to
// rounding, not bitwise).
//
// Backward, with x_c = x - m, x_hat = x_c * rstd, y = weight * x_hat + bias, dy = grad where y passes
// the TLU (y >= tau or NaN), A = sum(dy * x_c), B = sum(dy):
//   dx = weight * rstd * dy - weight * rstd * B / L - weight * rstd^3 * A / L * x_c,
// and the parameter gradients of frn's epilogue (cpu_common.h, param_grads_cpu) from A, B, T.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "frn.h"

namespace frn_det {
namespace cpu {
namespace {

// Welford lanes per contiguous run (4 vectors of 4 floats): independent dependency chains, few
// enough that the lanes' means, sums of squares and loaded values stay in the 16 SSE registers
// (32 lanes spilled them: 1.5x slower forward on 7x7 RoI planes, whose tail also grew to 17 values).
constexpr int kLanes = 16;
// NHWC: the longest per-channel Welford run (rows), as long as an NCHW lane's (kChunk / kLanes).
constexpr int64_t kRun = kChunk / kLanes;

// Count, mean and sum of squared deviations from the mean of a run of values.
template <typename acc_t>
struct Moments {
  int64_t n = 0;
  acc_t mean = 0;
  acc_t m2 = 0;
};

// Chan, Golub and LeVeque's combination: a becomes the moments of a's run followed by b's.
template <typename acc_t>
inline void combine(Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) {
    return;
  }
  if (a.n == 0) {
    a = b;
    return;
  }
  const int64_t n = a.n + b.n;
  const acc_t fb = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  const acc_t delta = b.mean - a.mean;
  a.mean = a.mean + delta * fb;
  a.m2 = a.m2 + b.m2 + delta * delta * (static_cast<acc_t>(a.n) * fb);
  a.n = n;
}

// 16-byte vectors of the accumulation type (GCC / Clang vector extensions). gcc does not vectorise
// the Welford lane loop written over plain arrays (it keeps the lanes in memory, scalar: 4x slower),
// so the lanes are written as vectors; the arithmetic per lane is the same IEEE operations.
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(16)));
  static constexpr int width = 16 / sizeof(acc_t);
};

// kLanes values of x from xr, in the accumulation type, as kLanes / width vectors.
template <typename scalar_t, typename acc_t>
inline void load_lanes(const scalar_t* __restrict__ xr, typename Vec<acc_t>::type* __restrict__ v) {
  constexpr int W = Vec<acc_t>::width;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(v, xr, kLanes * sizeof(acc_t));
  } else {
    acc_t tmp[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      tmp[j] = static_cast<acc_t>(xr[j]);
    }
    std::memcpy(v, tmp, kLanes * sizeof(acc_t));
  }
  (void)W;
}

// Chan's combination of two runs of c values each (no division): a becomes their 2c values' moments.
template <typename T, typename acc_t>
inline void combine_equal(T& mean_a, T& m2_a, const T& mean_b, const T& m2_b, acc_t c) {
  const T delta = mean_b - mean_a;
  mean_a = mean_a + delta * acc_t(0.5);
  m2_a = (m2_a + m2_b) + delta * delta * (c * acc_t(0.5));
}

// Moments of x[0, n) - s: Welford per lane over the first kLanes * (n / kLanes) values (lane j takes
// elements j, j + kLanes, ...), the lanes combined pairwise in a fixed tree (all of the same count),
// then the tail of n % kLanes values combined last.
template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
Moments<acc_t> run_moments(const scalar_t* __restrict__ x, int64_t n, acc_t s) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  constexpr int kVecs = kLanes / W;
  const int64_t q = n / kLanes;
  Moments<acc_t> out;
  if (q > 0) {
    V mean[kVecs] = {}, m2[kVecs] = {};
    for (int64_t k = 0; k < q; ++k) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(k + 1);
      V xv[kVecs];
      load_lanes<scalar_t, acc_t>(x + k * kLanes, xv);
      for (int j = 0; j < kVecs; ++j) {
        const V v = xv[j] - s;
        const V d = v - mean[j];
        mean[j] += d * inv;
        m2[j] += d * (v - mean[j]);
      }
    }
    acc_t c = static_cast<acc_t>(q); // values per lane, doubling at each level of the tree
    for (int half = kVecs / 2; half >= 1; half /= 2, c *= 2) {
      for (int j = 0; j < half; ++j) {
        combine_equal(mean[j], m2[j], mean[j + half], m2[j + half], c);
      }
    }
    acc_t lm[W], lm2[W];
    std::memcpy(lm, &mean[0], sizeof(lm));
    std::memcpy(lm2, &m2[0], sizeof(lm2));
    for (int half = W / 2; half >= 1; half /= 2, c *= 2) {
      for (int j = 0; j < half; ++j) {
        combine_equal(lm[j], lm2[j], lm[j + half], lm2[j + half], c);
      }
    }
    out = Moments<acc_t>{q * kLanes, lm[0], lm2[0]};
  }
  // The tail (fewer than kLanes values, in L1 now): the two-pass moments, sum then squared
  // deviations from the tail's mean, over 4 partial sums each (a scalar Welford here, with its
  // chain of divisions, cost more than the vector part on planes of a few hundred values).
  const int r = static_cast<int>(n - q * kLanes);
  if (r > 0) {
    const scalar_t* __restrict__ xt = x + q * kLanes;
    acc_t s1[4] = {}, s2[4] = {};
    for (int i = 0; i < r; ++i) {
      s1[i % 4] += static_cast<acc_t>(xt[i]) - s;
    }
    const acc_t mean_t = ((s1[0] + s1[1]) + (s1[2] + s1[3])) / static_cast<acc_t>(r);
    for (int i = 0; i < r; ++i) {
      const acc_t d = (static_cast<acc_t>(xt[i]) - s) - mean_t;
      s2[i % 4] += d * d;
    }
    combine(out, Moments<acc_t>{r, mean_t, (s2[0] + s2[1]) + (s2[2] + s2[3])});
  }
  return out;
}

// A plane's statistics from the moments of x - s.
template <typename acc_t>
struct PlaneStats {
  double mean;
  acc_t rstd;
};

template <typename acc_t>
inline PlaneStats<acc_t> finish(const Moments<acc_t>& m, acc_t s, acc_t eps_eff) {
  const acc_t var = m.n > 0 ? m.m2 / static_cast<acc_t>(m.n) : acc_t(0);
  return {static_cast<double>(s) + static_cast<double>(m.mean), acc_t(1) / std::sqrt(var + eps_eff)};
}

// The centre m = hi + lo in the accumulation type (lo = 0 for fp64), the same in forward and backward.
template <typename acc_t>
struct Centre {
  acc_t hi, lo;
};

template <typename acc_t>
inline Centre<acc_t> centre_of(double mean) {
  const acc_t hi = static_cast<acc_t>(mean);
  return {hi, static_cast<acc_t>(mean - static_cast<double>(hi))};
}

// ---- the element-wise math (no FMA contraction: see cpu_common.h) ------------------------------

template <typename acc_t>
inline acc_t centred(acc_t xi, Centre<acc_t> m) {
  return (xi - m.hi) - m.lo;
}

// Adds one element to the backward sums A = sum(dy * x_c), B = sum(dy), T = sum(g where y < tau).
template <bool kTLU, typename acc_t>
inline void accumulate(acc_t xc, acc_t gi, acc_t a, acc_t b, acc_t t, acc_t& sA, acc_t& sB, acc_t& sT) {
  const bool pass = passes<kTLU>(xc * a + b, t);
  const acc_t d = pass ? gi : acc_t(0);
  const acc_t e = pass ? acc_t(0) : gi;
  sT += e;
  sA += d * xc;
  sB += d;
}

// dx = dy * a + x_c * cx + c0.
template <bool kTLU, typename acc_t>
inline acc_t grad_x(acc_t xc, acc_t gi, acc_t a, acc_t b, acc_t t, acc_t cx, acc_t c0) {
  const acc_t d = passes<kTLU>(xc * a + b, t) ? gi : acc_t(0);
  return (d * a + xc * cx) + c0;
}

// Per-plane coefficients of dx: cx = -weight * rstd^3 * A / L, c0 = -weight * rstd * B / L.
template <typename acc_t>
inline void dx_coefficients(acc_t w, acc_t r, acc_t A, acc_t B, int64_t L, acc_t& cx, acc_t& c0) {
  const acc_t inv_l = L > 0 ? acc_t(1) / static_cast<acc_t>(L) : acc_t(0);
  cx = L > 0 ? -w * r * r * r * A * inv_l : acc_t(0);
  c0 = L > 0 ? -w * r * B * inv_l : acc_t(0);
}

// ---- contiguous runs (NCHW planes or chunks of them) ------------------------------------------

template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
void forward_apply(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, Centre<acc_t> m, acc_t a,
                   acc_t b, acc_t t) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(tlu<kTLU>(centred(static_cast<acc_t>(x[i]), m) * a + b, t));
  }
}

template <typename acc_t>
struct BwdSums {
  acc_t A = 0, B = 0, T = 0;
  void add(const BwdSums& o) {
    A += o.A;
    B += o.B;
    T += o.T;
  }
};

// Lanes as in frn_kernel.cpp's backward_sums, so that the loop vectorises.
constexpr int kSumLanes = 16;

template <typename acc_t>
inline acc_t lane_sum(const acc_t* s) {
  acc_t r = 0;
  for (int j = 0; j < kSumLanes; ++j) {
    r += s[j];
  }
  return r;
}

template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
BwdSums<acc_t> backward_sums(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, int64_t n,
                             Centre<acc_t> m, acc_t a, acc_t b, acc_t t) {
  acc_t sA[kSumLanes] = {}, sB[kSumLanes] = {}, sT[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      const acc_t xc = centred(static_cast<acc_t>(x[i + j]), m);
      accumulate<kTLU>(xc, static_cast<acc_t>(g[i + j]), a, b, t, sA[j], sB[j], sT[j]);
    }
  }
  for (; i < n; ++i) {
    const int j = static_cast<int>(i % kSumLanes);
    const acc_t xc = centred(static_cast<acc_t>(x[i]), m);
    accumulate<kTLU>(xc, static_cast<acc_t>(g[i]), a, b, t, sA[j], sB[j], sT[j]);
  }
  BwdSums<acc_t> s;
  s.A = lane_sum(sA);
  s.B = lane_sum(sB);
  s.T = lane_sum(sT);
  return s;
}

template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
void backward_apply(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                    int64_t n, Centre<acc_t> m, acc_t a, acc_t b, acc_t t, acc_t cx, acc_t c0) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xc = centred(static_cast<acc_t>(x[i]), m);
    dx[i] = static_cast<scalar_t>(grad_x<kTLU>(xc, static_cast<acc_t>(g[i]), a, b, t, cx, c0));
  }
}

// ---- drivers ----------------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardData {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x;
  scalar_t* out;
  double* mean;
  acc_t* rstd;
  const acc_t *w, *bias, *tau; // tau null: no TLU
  acc_t eps_eff;
};

template <typename scalar_t>
struct BackwardData {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t *g, *x;
  scalar_t* dx; // null: no grad_x
  const double* mean;
  const acc_t *rstd, *w, *bias, *tau;
  acc_t *A, *B, *T; // per-plane sums, (N, C)
};

// ---- NCHW -------------------------------------------------------------------------------------

template <typename scalar_t, bool kTLU>
void forward_nchw(const ForwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, mean, rstd, w, bias, tau, eps_eff] = d;
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  auto shift_of = [&](int64_t p) { return L > 0 ? static_cast<acc_t>(x[p * L]) : acc_t(0); };
  if (!splits_planes(P, L)) {
    // Fused: the plane is read from memory once and re-read from cache.
    at::parallel_for(0, P, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* xp = x + p * L;
        const acc_t s = shift_of(p);
        Moments<acc_t> m;
        for (int64_t k = 0; k < K; ++k) {
          combine(m, run_moments(xp + k * kChunk, chunk_len(k), s));
        }
        const PlaneStats<acc_t> st = finish(m, s, eps_eff);
        mean[p] = st.mean;
        rstd[p] = st.rstd;
        const int64_t c = p % C;
        forward_apply<scalar_t, kTLU>(xp, out + p * L, L, centre_of<acc_t>(st.mean), w[c] * st.rstd, bias[c], t_of(c));
      }
    });
    return;
  }
  // Few large planes: chunks in parallel, combined per plane in chunk order (as the fused path).
  std::vector<Moments<acc_t>> part(P * K);
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u / K, k = u % K;
      part[u] = run_moments(x + p * L + k * kChunk, chunk_len(k), shift_of(p));
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    Moments<acc_t> m;
    for (int64_t k = 0; k < K; ++k) {
      combine(m, part[p * K + k]);
    }
    const PlaneStats<acc_t> st = finish(m, shift_of(p), eps_eff);
    mean[p] = st.mean;
    rstd[p] = st.rstd;
  }
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u / K, k = u % K, c = p % C;
      const int64_t off = p * L + k * kChunk;
      forward_apply<scalar_t, kTLU>(x + off, out + off, chunk_len(k), centre_of<acc_t>(mean[p]), w[c] * rstd[p],
                                    bias[c], t_of(c));
    }
  });
}

template <typename scalar_t, bool kTLU>
void backward_nchw(const BackwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, mean, rstd, w, bias, tau, A, B, T] = d;
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  if (!splits_planes(P, L)) {
    at::parallel_for(0, P, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(2 * L, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const Centre<acc_t> m = centre_of<acc_t>(mean[p]);
        const acc_t a = w[c] * rstd[p];
        BwdSums<acc_t> s;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t off = p * L + k * kChunk;
          s.add(backward_sums<scalar_t, kTLU>(g + off, x + off, chunk_len(k), m, a, bias[c], t_of(c)));
        }
        A[p] = s.A;
        B[p] = s.B;
        T[p] = s.T;
        if (dx != nullptr) {
          acc_t cx, c0;
          dx_coefficients(w[c], rstd[p], s.A, s.B, L, cx, c0);
          backward_apply<scalar_t, kTLU>(g + p * L, x + p * L, dx + p * L, L, m, a, bias[c], t_of(c), cx, c0);
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
      part[u] = backward_sums<scalar_t, kTLU>(g + off, x + off, chunk_len(k), centre_of<acc_t>(mean[p]),
                                              w[c] * rstd[p], bias[c], t_of(c));
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
      acc_t cx, c0;
      dx_coefficients(w[c], rstd[p], A[p], B[p], L, cx, c0);
      backward_apply<scalar_t, kTLU>(g + off, x + off, dx + off, chunk_len(k), centre_of<acc_t>(mean[p]),
                                     w[c] * rstd[p], bias[c], t_of(c), cx, c0);
    }
  });
}

// ---- NHWC (channels_last) ---------------------------------------------------------------------
// Sample n is an (L, C) row-major matrix; the per-channel loops vectorise over c. Moments of rows
// [l0, l1) of every channel are kept as one count and C means and m2s.

// Welford over rows [l0, l1) of sample n (at most kRun rows), per channel, of x - s[c]: blocks of
// kLanes channels in vectors (the state stays in registers across the rows), the remaining channels
// in plain arrays. The same operations per channel either way.
template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
void welford_rows(const scalar_t* __restrict__ xs, int64_t C, int64_t l0, int64_t l1, const acc_t* __restrict__ s,
                  acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  using V = typename Vec<acc_t>::type;
  constexpr int kVecs = kLanes / Vec<acc_t>::width;
  int64_t c0 = 0;
  for (; c0 + kLanes <= C; c0 += kLanes) {
    V vm[kVecs] = {}, vm2[kVecs] = {}, vs[kVecs];
    std::memcpy(vs, s + c0, sizeof(vs));
    for (int64_t l = l0; l < l1; ++l) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(l - l0 + 1);
      V xv[kVecs];
      load_lanes<scalar_t, acc_t>(xs + l * C + c0, xv);
      for (int j = 0; j < kVecs; ++j) {
        const V v = xv[j] - vs[j];
        const V d = v - vm[j];
        vm[j] += d * inv;
        vm2[j] += d * (v - vm[j]);
      }
    }
    std::memcpy(mean + c0, vm, sizeof(vm));
    std::memcpy(m2 + c0, vm2, sizeof(vm2));
  }
  std::fill(mean + c0, mean + C, acc_t(0));
  std::fill(m2 + c0, m2 + C, acc_t(0));
  for (int64_t l = l0; l < l1; ++l) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(l - l0 + 1);
    const scalar_t* __restrict__ xr = xs + l * C;
    for (int64_t c = c0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(xr[c]) - s[c];
      const acc_t d = v - mean[c];
      mean[c] += d * inv;
      m2[c] += d * (v - mean[c]);
    }
  }
}

// Chan's combination per channel: (na, ma, m2a) becomes the moments of its rows followed by b's.
template <typename acc_t>
void combine_rows(int64_t& na, acc_t* __restrict__ ma, acc_t* __restrict__ m2a, int64_t nb,
                  const acc_t* __restrict__ mb, const acc_t* __restrict__ m2b, int64_t C) {
  if (nb == 0) {
    return;
  }
  if (na == 0) {
    std::copy(mb, mb + C, ma);
    std::copy(m2b, m2b + C, m2a);
    na = nb;
    return;
  }
  const int64_t n = na + nb;
  const acc_t fb = static_cast<acc_t>(nb) / static_cast<acc_t>(n);
  const acc_t fab = static_cast<acc_t>(na) * fb;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t delta = mb[c] - ma[c];
    ma[c] = ma[c] + delta * fb;
    m2a[c] = m2a[c] + m2b[c] + delta * delta * fab;
  }
  na = n;
}

// Moments of rows [l0, l1) of a sample (xs: its first row) per channel, in runs of kRun rows from l0;
// scratch holds 2 * C values. Returns the count.
template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
int64_t moments_rows(const scalar_t* xs, int64_t C, int64_t l0, int64_t l1, const acc_t* s, acc_t* mean, acc_t* m2,
                     acc_t* scratch) {
  int64_t n = 0;
  for (int64_t r0 = l0; r0 < l1; r0 += kRun) {
    const int64_t r1 = std::min(l1, r0 + kRun);
    welford_rows(xs, C, r0, r1, s, scratch, scratch + C);
    combine_rows(n, mean, m2, r1 - r0, scratch, scratch + C, C);
  }
  return n;
}

template <typename scalar_t, bool kTLU>
void forward_nhwc(const ForwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, mean, rstd, w, bias, tau, eps_eff] = d;
  // Per (n, c): the centre and the scale weight * rstd, for the apply loops.
  std::vector<acc_t> hi(N * C), lo(N * C), scale(N * C);
  auto set_plane = [&](int64_t p, int64_t count, acc_t m, acc_t m2, acc_t s) {
    const PlaneStats<acc_t> st = finish(Moments<acc_t>{count, m, m2}, s, eps_eff);
    mean[p] = st.mean;
    rstd[p] = st.rstd;
    const Centre<acc_t> ctr = centre_of<acc_t>(st.mean);
    hi[p] = ctr.hi;
    lo[p] = ctr.lo;
    scale[p] = w[p % C] * st.rstd;
  };
  auto shifts = [&](int64_t n, acc_t* s) {
    for (int64_t c = 0; c < C; ++c) {
      s[c] = L > 0 ? static_cast<acc_t>(x[n * L * C + c]) : acc_t(0);
    }
  };
  // out = TLU(((x - hi) - lo) * scale + bias) over rows [l0, l1) of sample n.
  auto apply_rows = [&](int64_t n, int64_t l0, int64_t l1) {
    const acc_t* __restrict__ h = hi.data() + n * C;
    const acc_t* __restrict__ o = lo.data() + n * C;
    const acc_t* __restrict__ a = scale.data() + n * C;
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* __restrict__ xr = x + (n * L + l) * C;
      scalar_t* __restrict__ orow = out + (n * L + l) * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xc = (static_cast<acc_t>(xr[c]) - h[c]) - o[c];
        orow[c] = static_cast<scalar_t>(tlu<kTLU>(xc * a[c] + bias[c], kTLU ? tau[c] : acc_t(0)));
      }
    }
  };
  if (fuses_samples(L, C)) {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(L * C, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(5 * C); // s, mean, m2, scratch (2 C)
      acc_t *s = buf.data(), *m = s + C, *m2 = m + C, *scratch = m2 + C;
      for (int64_t n = begin; n < end; ++n) {
        shifts(n, s);
        const int64_t count = moments_rows(x + n * L * C, C, 0, L, s, m, m2, scratch);
        for (int64_t c = 0; c < C; ++c) {
          set_plane(n * C + c, count, m[c], m2[c], s[c]);
        }
        apply_rows(n, 0, L);
      }
    });
    return;
  }
  const int64_t R = std::max<int64_t>(1, kChunk / C); // rows per task
  const int64_t K = divup(L, R);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (R * C));
  std::vector<acc_t> shift(N * C);
  for (int64_t n = 0; n < N; ++n) {
    shifts(n, shift.data() + n * C);
  }
  std::vector<acc_t> part(N * K * 2 * C); // per task: C means, C m2s
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * C);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      acc_t* m = part.data() + u * 2 * C;
      moments_rows(x + n * L * C, C, k * R, std::min(L, (k + 1) * R), shift.data() + n * C, m, m + C, scratch.data());
    }
  });
  // Combined serially (a fraction of the data), in task order.
  std::vector<acc_t> m(2 * C);
  for (int64_t n = 0; n < N; ++n) {
    int64_t count = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* pm = part.data() + (n * K + k) * 2 * C;
      combine_rows(count, m.data(), m.data() + C, std::min(L, (k + 1) * R) - k * R, pm, pm + C, C);
    }
    for (int64_t c = 0; c < C; ++c) {
      set_plane(n * C + c, count, m[c], m[C + c], shift[n * C + c]);
    }
  }
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      apply_rows(n, k * R, std::min(L, (k + 1) * R));
    }
  });
}

template <typename scalar_t, bool kTLU>
void backward_nhwc(const BackwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, mean, rstd, w, bias, tau, A, B, T] = d;
  std::vector<acc_t> hi(N * C), lo(N * C), scale(N * C); // the centre, weight * rstd
  for (int64_t p = 0; p < N * C; ++p) {
    const Centre<acc_t> ctr = centre_of<acc_t>(mean[p]);
    hi[p] = ctr.hi;
    lo[p] = ctr.lo;
    scale[p] = w[p % C] * rstd[p];
  }
  auto sums_rows = [&](int64_t n, int64_t l0, int64_t l1, acc_t* __restrict__ sA, acc_t* __restrict__ sB,
                       acc_t* __restrict__ sT) {
    const acc_t* __restrict__ h = hi.data() + n * C;
    const acc_t* __restrict__ o = lo.data() + n * C;
    const acc_t* __restrict__ a = scale.data() + n * C;
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* __restrict__ xr = x + (n * L + l) * C;
      const scalar_t* __restrict__ gr = g + (n * L + l) * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xc = (static_cast<acc_t>(xr[c]) - h[c]) - o[c];
        accumulate<kTLU>(xc, static_cast<acc_t>(gr[c]), a[c], bias[c], kTLU ? tau[c] : acc_t(0), sA[c], sB[c], sT[c]);
      }
    }
  };
  std::vector<acc_t> cx(N * C), c0(N * C);
  auto apply_rows = [&](int64_t n, int64_t l0, int64_t l1) {
    const acc_t* __restrict__ h = hi.data() + n * C;
    const acc_t* __restrict__ o = lo.data() + n * C;
    const acc_t* __restrict__ a = scale.data() + n * C;
    const acc_t* __restrict__ kx = cx.data() + n * C;
    const acc_t* __restrict__ k0 = c0.data() + n * C;
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* __restrict__ xr = x + (n * L + l) * C;
      const scalar_t* __restrict__ gr = g + (n * L + l) * C;
      scalar_t* __restrict__ dr = dx + (n * L + l) * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xc = (static_cast<acc_t>(xr[c]) - h[c]) - o[c];
        dr[c] = static_cast<scalar_t>(
            grad_x<kTLU>(xc, static_cast<acc_t>(gr[c]), a[c], bias[c], kTLU ? tau[c] : acc_t(0), kx[c], k0[c]));
      }
    }
  };
  auto finish_sample = [&](int64_t n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t p = n * C + c;
      dx_coefficients(w[c], rstd[p], A[p], B[p], L, cx[p], c0[p]);
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
          apply_rows(n, 0, L);
        }
      }
    });
    return;
  }
  const int64_t R = std::max<int64_t>(1, kChunk / C);
  const int64_t K = divup(L, R);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (2 * R * C));
  std::vector<acc_t> part(N * K * 3 * C); // per task: A, B, T for C channels
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      acc_t* sA = part.data() + u * 3 * C;
      std::fill(sA, sA + 3 * C, acc_t(0));
      sums_rows(n, k * R, std::min(L, (k + 1) * R), sA, sA + C, sA + 2 * C);
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    zero_sums(n);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* s = part.data() + (n * K + k) * 3 * C;
      for (int64_t c = 0; c < C; ++c) {
        A[n * C + c] += s[c];
        B[n * C + c] += s[C + c];
        T[n * C + c] += s[2 * C + c];
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
      apply_rows(n, k * R, std::min(L, (k + 1) * R));
    }
  });
}

// ---- op implementations -----------------------------------------------------------------------

CenteredForwardOut frn_centered_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            const std::optional<at::Tensor>& tau, double eps,
                                            const std::optional<at::Tensor>& eps_l) {
  const FrnArgs a = prepare_forward(x, weight, bias, tau, eps, eps_l);
  TORCH_INTERNAL_ASSERT(a.x.device().is_cpu());
  at::Tensor out = empty_cpu_output(a.x, a.layout);
  at::Tensor mean = at::empty({a.N, a.C}, a.x.options().dtype(centred_mean_type));
  at::Tensor rstd = at::empty({a.N, a.C}, a.x.options().dtype(a.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_centered_forward_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const ForwardData<scalar_t> d{
        a.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<double>(),
        rstd.mutable_data_ptr<acc_t>(), a.weight.const_data_ptr<acc_t>(), a.bias.const_data_ptr<acc_t>(),
        a.tau.defined() ? a.tau.const_data_ptr<acc_t>() : nullptr, eps_eff_of<acc_t>(a)};
    with_tlu(d.tau != nullptr, [&](auto tlu) {
      constexpr bool kTLU = decltype(tlu)::value;
      a.layout == Layout::NHWC ? forward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                               : forward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
    });
  });
  return {out, mean, rstd};
}

BackwardOut frn_centered_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const std::optional<at::Tensor>& tau,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& eps_l, bool grad_input) {
  const FrnArgs a = prepare_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input, &mean);
  TORCH_INTERNAL_ASSERT(a.x.device().is_cpu());
  const auto opts = a.x.options().dtype(a.acc);
  at::Tensor grad_x = a.grad_input ? empty_cpu_output(a.x, a.layout) : at::empty({0}, a.x.options());
  at::Tensor A = at::empty({a.N, a.C}, opts);
  at::Tensor B = at::empty({a.N, a.C}, opts);
  at::Tensor T = at::empty({a.N, a.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_centered_backward_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const BackwardData<scalar_t> d{
        a.grad_out.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
        a.grad_input ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, a.mean.const_data_ptr<double>(),
        a.rstd.const_data_ptr<acc_t>(), a.weight.const_data_ptr<acc_t>(), a.bias.const_data_ptr<acc_t>(),
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

} // namespace
} // namespace cpu
} // namespace frn_det

TORCH_LIBRARY_IMPL(frn_det, CPU, m) {
  m.impl("frn_centered", TORCH_FN(frn_det::cpu::frn_centered_forward_cpu));
  m.impl("frn_centered_backward", TORCH_FN(frn_det::cpu::frn_centered_backward_cpu));
}
