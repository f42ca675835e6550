// CPU kernels of torch.ops.frn_det.frn_centered / frn_centered_backward: FRN's centred variant,
// per (sample, channel) plane
//   m = mean(x), v = mean((x - m)^2), rstd = 1 / sqrt(v + eps + |eps_l|),
//   y = (x - m) * rstd * weight + bias, out = TLU(y) = max(y, tau).
//
// Statistics: one read of the plane, as shifted sums over blocks combined by Chan's formula. The
// values are shifted by the plane's first element s (x - s is exact where x is within a factor 2 of
// s), so the mean is m = s + mean(x - s) to the precision of the spread, not of the mean's magnitude.
// Each of kLanes lanes (lane j takes elements j, j + kLanes, ...) cuts its values into blocks of
// kBlock; a block's sums of w = x - t and w^2, with t the block's first value, give its moments.
// m2 = S2 - S1^2 / b loses at most a factor b + 1 of precision (t is one of the values, so
// S2 <= (b + 1) m2); the Welford update per value that this replaced was 1.5x slower. Blocks
// combine in order (Chan, Golub and LeVeque), the lanes in a fixed pairwise tree, the chunks in
// order: results are bitwise the same run to run, on any thread count and on either NCHW path
// (fused per plane, or split into chunks when there are fewer planes than threads).
// The mean is stored as float64 and used as hi + lo in the accumulation type (centre_of):
// x - m = (x - hi) - lo. A constant plane (and so a 1x1 plane) has w = 0 and x - s = 0 everywhere:
// m = s exactly, v = 0, and the output is exactly bias.
//
// NHWC (channels_last): tasks are blocks of rows of one sample (schedules.h, as for frn); each
// channel's rows are cut into blocks of kBlock the same way (results agree with NCHW to rounding,
// not bitwise).
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
#include "cpu/schedules.h"
#include "frn.h"

namespace frn_det {
namespace cpu {
namespace {

// Lanes of a contiguous run (4 vectors of 4 floats): independent dependency chains, few enough that
// the lanes' shifts, sums and loaded values stay in the 16 SSE registers.
constexpr int kLanes = 16;
// Values per lane (rows of channels in NHWC) in a block of shifted sums: long enough that the
// per-block combination costs little (16 was no faster), short enough to bound its loss of
// precision (see above; 16 lost 4x more than 8 with an outlier as a block's first value).
constexpr int64_t kBlock = 8;
// NHWC: the rows of a run whose moments stay in registers, as many as an NCHW lane's (kChunk / kLanes).
constexpr int64_t kRun = kChunk / kLanes;

// Count, mean and sum of squared deviations from the mean of a run of values.
template <typename acc_t>
struct Moments {
  int64_t n = 0;
  acc_t mean = 0;
  acc_t m2 = 0;
};

// Chan, Golub and LeVeque's combination of the moments of a run a (na values) followed by a run b
// (nb): fb = nb / (na + nb), fab = na * fb. T is acc_t or a vector of it, the same operations per lane.
template <typename T, typename acc_t>
inline void chan(T& mean_a, T& m2_a, const T& mean_b, const T& m2_b, acc_t fb, acc_t fab) {
  const T delta = mean_b - mean_a;
  mean_a = mean_a + delta * fb;
  m2_a = (m2_a + m2_b) + delta * delta * fab;
}

// a becomes the moments of a's run followed by b's.
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
  chan(a.mean, a.m2, b.mean, b.m2, fb, static_cast<acc_t>(a.n) * fb);
  a.n = n;
}

// A block's moments of x - s from its sums S1, S2 of w = x - t over b values: mean = (t - s) + S1 / b,
// m2 = S2 - S1^2 / b.
template <typename T, typename acc_t>
inline void block_moments(T& mean, T& m2, const T& t_minus_s, const T& s1, const T& s2, acc_t inv_b) {
  const T m1 = s1 * inv_b;
  mean = t_minus_s + m1;
  m2 = s2 - s1 * m1;
}

// 16-byte vectors of the accumulation type (GCC / Clang vector extensions). gcc does not vectorise
// the lane loops written over plain arrays (it keeps the lanes in memory: 5x slower), so the lanes
// are written as vectors, the same IEEE operations per lane. 32-byte vectors run 3.5x slower even in
// the AVX2 build: gcc lowers them for the baseline ISA before run_task inlines them.
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(16)));
  static constexpr int width = 16 / sizeof(acc_t);
};

// kLanes values of x from xr, in the accumulation type, as kLanes / width vectors.
template <typename scalar_t, typename acc_t>
inline void load_lanes(const scalar_t* __restrict__ xr, typename Vec<acc_t>::type* __restrict__ v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(v, xr, kLanes * sizeof(acc_t));
  } else {
    acc_t tmp[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      tmp[j] = static_cast<acc_t>(xr[j]);
    }
    std::memcpy(v, tmp, kLanes * sizeof(acc_t));
  }
}

// Per lane, the moments of `rows` values minus the lane's shift (kV lanes, each T: a vector or a
// scalar), the values in blocks of kBlock combined in order; load(k, v) loads row k's values into v.
template <int kV, typename T, typename acc_t, typename Load>
inline void block_moments_rows(int64_t rows, const T* __restrict__ shift, T* __restrict__ mean, T* __restrict__ m2,
                               Load load) {
  for (int64_t k0 = 0; k0 < rows; k0 += kBlock) {
    const int64_t b = std::min(kBlock, rows - k0);
    T t[kV], s1[kV] = {}, s2[kV] = {};
    load(k0, t);
    for (int64_t k = k0 + 1; k < k0 + b; ++k) { // the block's first row has w = 0
      T xv[kV];
      load(k, xv);
      for (int j = 0; j < kV; ++j) {
        const T w = xv[j] - t[j];
        s1[j] += w;
        s2[j] += w * w;
      }
    }
    const acc_t inv_b = acc_t(1) / static_cast<acc_t>(b);
    const acc_t fb = static_cast<acc_t>(b) / static_cast<acc_t>(k0 + b);
    for (int j = 0; j < kV; ++j) {
      T bm, bm2;
      block_moments(bm, bm2, T(t[j] - shift[j]), s1[j], s2[j], inv_b);
      if (k0 == 0) {
        mean[j] = bm;
        m2[j] = bm2;
      } else {
        chan(mean[j], m2[j], bm, bm2, fb, static_cast<acc_t>(k0) * fb);
      }
    }
  }
}

// Moments of x[0, n) - s: per lane over the first kLanes * (n / kLanes) values, the lanes combined
// pairwise in a fixed tree (all of the same count), then the tail of n % kLanes values combined last.
template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
Moments<acc_t> run_moments(const scalar_t* __restrict__ x, int64_t n, acc_t s) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  constexpr int kVecs = kLanes / W;
  const int64_t q = n / kLanes;
  Moments<acc_t> out;
  if (q > 0) {
    V shift[kVecs], mean[kVecs], m2[kVecs];
    for (int j = 0; j < kVecs; ++j) {
      shift[j] = V{} + s;
    }
    block_moments_rows<kVecs, V, acc_t>(q, shift, mean, m2,
                                       [&](int64_t k, V* v) { load_lanes<scalar_t, acc_t>(x + k * kLanes, v); });
    acc_t c = static_cast<acc_t>(q); // values per lane, doubling at each level of the tree
    for (int half = kVecs / 2; half >= 1; half /= 2, c *= 2) {
      for (int j = 0; j < half; ++j) {
        chan(mean[j], m2[j], mean[j + half], m2[j + half], acc_t(0.5), c * acc_t(0.5));
      }
    }
    acc_t lm[W], lm2[W];
    std::memcpy(lm, &mean[0], sizeof(lm));
    std::memcpy(lm2, &m2[0], sizeof(lm2));
    for (int half = W / 2; half >= 1; half /= 2, c *= 2) {
      for (int j = 0; j < half; ++j) {
        chan(lm[j], lm2[j], lm[j + half], lm2[j + half], acc_t(0.5), c * acc_t(0.5));
      }
    }
    out = Moments<acc_t>{q * kLanes, lm[0], lm2[0]};
  }
  // The tail (fewer than kLanes values, in L1 now): the two-pass moments, sum then squared
  // deviations from the tail's mean, over 4 partial sums each.
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

// x_c = (x - hi) - lo for backward_sums (cpu_common.h).
template <typename acc_t>
struct Centring {
  Centre<acc_t> m;
  acc_t operator()(acc_t xi) const {
    return centred(xi, m);
  }
};

template <typename scalar_t, bool kTLU, typename acc_t = typename Acc<scalar_t>::type>
void backward_apply(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                    int64_t n, Centre<acc_t> m, acc_t a, acc_t b, acc_t t, acc_t cx, acc_t c0) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xc = centred(static_cast<acc_t>(x[i]), m);
    dx[i] = static_cast<scalar_t>(grad_x<kTLU>(xc, static_cast<acc_t>(g[i]), a, b, t, cx, c0));
  }
}

// ---- drivers ----------------------------------------------------------------------------------

// ---- NCHW: the work of each run, in schedule_planes (schedules.h) ------------------------------

template <typename scalar_t, bool kTLU>
void forward_nchw(const ForwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, mean, rstd, w, bias, tau, eps_eff] = d;
  auto shift_of = [&](int64_t p) { return L > 0 ? static_cast<acc_t>(x[p * L]) : acc_t(0); };
  schedule_planes<Moments<acc_t>>(
      P, L, 1, true, [&](int64_t p, int64_t off, int64_t n) { return run_moments(x + off, n, shift_of(p)); },
      [](Moments<acc_t>& m, const Moments<acc_t>& part) { combine(m, part); },
      [&](int64_t p, const Moments<acc_t>& m) {
        const PlaneStats<acc_t> st = finish(m, shift_of(p), eps_eff);
        mean[p] = st.mean;
        rstd[p] = st.rstd;
      },
      [&](int64_t p, int64_t off, int64_t n) {
        const int64_t c = p % C;
        forward_apply<scalar_t, kTLU>(x + off, out + off, n, centre_of<acc_t>(mean[p]), w[c] * rstd[p], bias[c],
                                      kTLU ? tau[c] : acc_t(0));
      });
}

template <typename scalar_t, bool kTLU>
void backward_nchw(const BackwardData<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, mean, rstd, w, bias, tau, A, B, T] = d;
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  schedule_plane_sums(
      P, L, dx != nullptr, A, B, T,
      [&](int64_t p, int64_t off, int64_t n) {
        const int64_t c = p % C;
        return backward_sums<scalar_t, kTLU>(g + off, x + off, n, Centring<acc_t>{centre_of<acc_t>(mean[p])},
                                             w[c] * rstd[p], bias[c], t_of(c));
      },
      [&](int64_t p, int64_t off, int64_t n) {
        const int64_t c = p % C;
        acc_t cx, c0;
        dx_coefficients(w[c], rstd[p], A[p], B[p], L, cx, c0);
        backward_apply<scalar_t, kTLU>(g + off, x + off, dx + off, n, centre_of<acc_t>(mean[p]), w[c] * rstd[p],
                                       bias[c], t_of(c), cx, c0);
      });
}

// ---- NHWC (channels_last) ---------------------------------------------------------------------
// Sample n is an (L, C) row-major matrix; the per-channel loops vectorise over c. Moments of rows
// [l0, l1) of every channel are kept as one count and C means and m2s.

// Moments of rows [l0, l1) of sample n (at most kRun rows), per channel, of x - s[c]: groups of
// kLanes channels in vectors (the state stays in registers across the rows), the remaining channels
// one at a time. The same operations per channel either way.
template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
void run_rows(const scalar_t* __restrict__ xs, int64_t C, int64_t l0, int64_t l1, const acc_t* __restrict__ s,
              acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  using V = typename Vec<acc_t>::type;
  constexpr int kVecs = kLanes / Vec<acc_t>::width;
  const scalar_t* __restrict__ x0 = xs + l0 * C;
  int64_t c0 = 0;
  for (; c0 + kLanes <= C; c0 += kLanes) {
    V vs[kVecs], vm[kVecs], vm2[kVecs];
    std::memcpy(vs, s + c0, sizeof(vs));
    block_moments_rows<kVecs, V, acc_t>(l1 - l0, vs, vm, vm2,
                                       [&](int64_t k, V* v) { load_lanes<scalar_t, acc_t>(x0 + k * C + c0, v); });
    std::memcpy(mean + c0, vm, sizeof(vm));
    std::memcpy(m2 + c0, vm2, sizeof(vm2));
  }
  for (int64_t c = c0; c < C; ++c) {
    block_moments_rows<1, acc_t, acc_t>(l1 - l0, s + c, mean + c, m2 + c,
                                        [&](int64_t k, acc_t* v) { v[0] = static_cast<acc_t>(x0[k * C + c]); });
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
    chan(ma[c], m2a[c], mb[c], m2b[c], fb, fab);
  }
  na = n;
}

// Moments of rows [l0, l1) of a sample (xs: its first row) per channel, in runs of kRun rows from l0;
// scratch holds 2 * C values.
template <typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
void moments_rows(const scalar_t* xs, int64_t C, int64_t l0, int64_t l1, const acc_t* s, acc_t* mean, acc_t* m2,
                     acc_t* scratch) {
  int64_t n = 0;
  for (int64_t r0 = l0; r0 < l1; r0 += kRun) {
    const int64_t r1 = std::min(l1, r0 + kRun);
    run_rows(xs, C, r0, r1, s, scratch, scratch + C);
    combine_rows(n, mean, m2, r1 - r0, scratch, scratch + C, C);
  }
}

// The per-channel centre hi + lo and scale weight * rstd of every (n, c), for the NHWC element-wise
// loops (written out in each loop: a callable per element there stops gcc vectorising them, 2x slower).
template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> hi, lo, scale;
  explicit ChannelAffine(int64_t P) : hi(P), lo(P), scale(P) {}
  void set(int64_t p, double mean, acc_t scale_p) {
    const Centre<acc_t> ctr = centre_of<acc_t>(mean);
    hi[p] = ctr.hi;
    lo[p] = ctr.lo;
    scale[p] = scale_p;
  }
};

template <typename scalar_t, bool kTLU>
void forward_nhwc(const ForwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [x, out, mean, rstd, w, bias, tau, eps_eff] = d;
  // Each channel's values are shifted by its first row's value (see the file's comment).
  std::vector<acc_t> shift(N * C);
  for (int64_t p = 0; p < N * C; ++p) {
    shift[p] = L > 0 ? static_cast<acc_t>(x[(p / C) * L * C + p % C]) : acc_t(0);
  }
  ChannelAffine<acc_t> affine(N * C);
  schedule_samples<acc_t>(
      N, C, L, 2, 1, true,
      // Moments of rows [l0, l1) of sample n: C means into s, C m2s into s + C.
      [&](int64_t n, int64_t l0, int64_t l1, acc_t* s) {
        thread_local std::vector<acc_t> scratch; // per thread, not per task: tasks are many and small
        scratch.resize(2 * C);
        moments_rows(x + n * L * C, C, l0, l1, shift.data() + n * C, s, s + C, scratch.data());
      },
      [&](acc_t* into, int64_t rows_into, const acc_t* part, int64_t rows) {
        combine_rows(rows_into, into, into + C, rows, part, part + C, C);
      },
      [&](int64_t n, const acc_t* s) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t p = n * C + c;
          const PlaneStats<acc_t> st = finish(Moments<acc_t>{L, s[c], s[C + c]}, shift[p], eps_eff);
          mean[p] = st.mean;
          rstd[p] = st.rstd;
          affine.set(p, st.mean, w[c] * st.rstd);
        }
      },
      // out = TLU(x_c * weight * rstd + bias) over rows [l0, l1) of sample n.
      [&](int64_t n, int64_t l0, int64_t l1) {
        const acc_t* __restrict__ h = affine.hi.data() + n * C;
        const acc_t* __restrict__ o = affine.lo.data() + n * C;
        const acc_t* __restrict__ a = affine.scale.data() + n * C;
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* __restrict__ xr = x + (n * L + l) * C;
          scalar_t* __restrict__ orow = out + (n * L + l) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xc = (static_cast<acc_t>(xr[c]) - h[c]) - o[c];
            orow[c] = static_cast<scalar_t>(tlu<kTLU>(xc * a[c] + bias[c], kTLU ? tau[c] : acc_t(0)));
          }
        }
      });
}

template <typename scalar_t, bool kTLU>
void backward_nhwc(const BackwardData<scalar_t>& d, int64_t N, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto [g, x, dx, mean, rstd, w, bias, tau, A, B, T] = d;
  ChannelAffine<acc_t> affine(N * C);
  for (int64_t p = 0; p < N * C; ++p) {
    affine.set(p, mean[p], w[p % C] * rstd[p]);
  }
  std::vector<acc_t> cx(N * C), c0(N * C);
  schedule_sample_sums(
      N, C, L, dx != nullptr, A, B, T,
      // The per-channel sums A, B, T over rows [l0, l1) of sample n, into s, s + C, s + 2 C.
      [&](int64_t n, int64_t l0, int64_t l1, acc_t* __restrict__ s) {
        const acc_t* __restrict__ h = affine.hi.data() + n * C;
        const acc_t* __restrict__ o = affine.lo.data() + n * C;
        const acc_t* __restrict__ a = affine.scale.data() + n * C;
        acc_t* __restrict__ sA = s;
        acc_t* __restrict__ sB = s + C;
        acc_t* __restrict__ sT = s + 2 * C;
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* __restrict__ xr = x + (n * L + l) * C;
          const scalar_t* __restrict__ gr = g + (n * L + l) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xc = (static_cast<acc_t>(xr[c]) - h[c]) - o[c];
            accumulate<kTLU>(xc, static_cast<acc_t>(gr[c]), a[c], bias[c], kTLU ? tau[c] : acc_t(0), sA[c], sB[c], sT[c]);
          }
        }
      },
      [&](int64_t n) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t p = n * C + c;
          dx_coefficients(w[c], rstd[p], A[p], B[p], L, cx[p], c0[p]);
        }
      },
      [&](int64_t n, int64_t l0, int64_t l1) {
        const acc_t* __restrict__ h = affine.hi.data() + n * C;
        const acc_t* __restrict__ o = affine.lo.data() + n * C;
        const acc_t* __restrict__ a = affine.scale.data() + n * C;
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
  run_forward(a, out, &mean, rstd, [&](const auto& d, auto tlu) {
    using scalar_t = typename std::decay_t<decltype(d)>::scalar_type;
    constexpr bool kTLU = decltype(tlu)::value;
    a.layout == Layout::NHWC ? forward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                             : forward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
  });
  return {out, mean, rstd};
}

BackwardOut frn_centered_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const std::optional<at::Tensor>& tau,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& eps_l, bool grad_input) {
  const FrnArgs a = prepare_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input, &mean);
  TORCH_INTERNAL_ASSERT(a.x.device().is_cpu());
  return run_backward(a, [&](const auto& d, auto tlu) {
    using scalar_t = typename std::decay_t<decltype(d)>::scalar_type;
    constexpr bool kTLU = decltype(tlu)::value;
    a.layout == Layout::NHWC ? backward_nhwc<scalar_t, kTLU>(d, a.N, a.C, a.L)
                             : backward_nchw<scalar_t, kTLU>(d, a.N * a.C, a.C, a.L);
  });
}

} // namespace
} // namespace cpu
} // namespace frn_det

TORCH_LIBRARY_IMPL(frn_det, CPU, m) {
  m.impl("frn_centered", TORCH_FN(frn_det::cpu::frn_centered_forward_cpu));
  m.impl("frn_centered_backward", TORCH_FN(frn_det::cpu::frn_centered_backward_cpu));
}
