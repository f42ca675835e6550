// CPU kernels of torch.ops.frn_det.frn / frn_backward.
//
// NCHW: one task per plane (sum of squares, then normalise + affine + TLU while the plane is still
// in L2). When there are fewer planes than threads, planes are split into chunks and the two
// phases run as separate parallel loops. NHWC (channels_last): tasks are blocks of rows of one
// sample; every row is C contiguous channels, so the per-channel loops vectorise.
// Sums always run over fixed chunks of a plane in the same order, so results do not depend on the
// thread count or on which path ran.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "frn.h"

namespace frn_det {
namespace {

using at::vec::Vectorized;

// Elements per chunk of a plane: the unit of summation order and of intra-plane parallelism.
constexpr int64_t kChunk = 4096;
// Below this many elements per task, parallel_for stays on one thread.
constexpr int64_t kGrainElems = 32768;

int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Moves 2 * Vectorized<acc_t>::size() elements per step between memory and acc-type vectors.
template <typename scalar_t>
struct VecIO {
  using acc_t = scalar_t;
  using aVec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * aVec::size();
  static inline void load(const scalar_t* p, aVec& a, aVec& b) {
    a = aVec::loadu(p);
    b = aVec::loadu(p + aVec::size());
  }
  static inline void store(scalar_t* p, const aVec& a, const aVec& b) {
    a.store(p);
    b.store(p + aVec::size());
  }
};

template <typename scalar_t>
struct VecIOReduced { // fp16 / bf16: widen to fp32 on load, narrow on store
  using acc_t = float;
  using aVec = Vectorized<float>;
  static_assert(Vectorized<scalar_t>::size() == 2 * Vectorized<float>::size(), "vector widths");
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static inline void load(const scalar_t* p, aVec& a, aVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
  }
  static inline void store(scalar_t* p, const aVec& a, const aVec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
};

template <>
struct VecIO<at::Half> : VecIOReduced<at::Half> {};
template <>
struct VecIO<at::BFloat16> : VecIOReduced<at::BFloat16> {};

template <typename acc_t>
inline acc_t rstd_from(acc_t sumsq, int64_t L, acc_t eps_eff) {
  const acc_t nu2 = L > 0 ? sumsq / static_cast<acc_t>(L) : acc_t(0);
  return acc_t(1) / std::sqrt(nu2 + eps_eff);
}

template <typename acc_t, typename aVec>
inline acc_t hsum(const aVec& v) {
  alignas(64) acc_t buf[aVec::size()];
  v.store(buf);
  acc_t s = 0;
  for (int64_t i = 0; i < aVec::size(); ++i) {
    s += buf[i];
  }
  return s;
}

// ---- contiguous runs (NCHW planes or chunks of them) ------------------------------------------

template <typename scalar_t>
typename VecIO<scalar_t>::acc_t sum_squares(const scalar_t* x, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  aVec s0(0), s1(0);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    aVec a, b;
    IO::load(x + i, a, b);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  acc_t s = hsum<acc_t>(s0 + s1);
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s += v * v;
  }
  return s;
}

// out = max(x * a + b, t) (TLU) or x * a + b.
template <typename scalar_t, bool kTLU>
void forward_apply(
    const scalar_t* x, scalar_t* out, int64_t n,
    typename VecIO<scalar_t>::acc_t a, typename VecIO<scalar_t>::acc_t b, typename VecIO<scalar_t>::acc_t t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const aVec av(a), bv(b), tv(t);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    aVec x0, x1;
    IO::load(x + i, x0, x1);
    aVec y0 = x0 * av + bv;
    aVec y1 = x1 * av + bv;
    if (kTLU) { // y >= t keeps y (ties go to y); NaN compares false and yields t, as the reference
      y0 = aVec::blendv(tv, y0, y0 >= tv);
      y1 = aVec::blendv(tv, y1, y1 >= tv);
    }
    IO::store(out + i, y0, y1);
  }
  for (; i < n; ++i) {
    acc_t y = static_cast<acc_t>(x[i]) * a + b;
    if (kTLU) {
      y = y >= t ? y : t;
    }
    out[i] = static_cast<scalar_t>(y);
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

// The TLU mask is recomputed exactly as in forward_apply (same a, b and expression).
template <typename scalar_t, bool kTLU>
BwdSums<typename VecIO<scalar_t>::acc_t> backward_sums(
    const scalar_t* g, const scalar_t* x, int64_t n,
    typename VecIO<scalar_t>::acc_t a, typename VecIO<scalar_t>::acc_t b, typename VecIO<scalar_t>::acc_t t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const aVec av(a), bv(b), tv(t), zero(0);
  aVec A(0), B(0), T(0);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    aVec x0, x1, g0, g1;
    IO::load(x + i, x0, x1);
    IO::load(g + i, g0, g1);
    aVec d0 = g0, d1 = g1;
    if (kTLU) {
      const aVec y0 = x0 * av + bv;
      const aVec y1 = x1 * av + bv;
      const aVec m0 = y0 >= tv, m1 = y1 >= tv;
      d0 = aVec::blendv(zero, g0, m0);
      d1 = aVec::blendv(zero, g1, m1);
      T = T + aVec::blendv(g0, zero, m0) + aVec::blendv(g1, zero, m1);
    }
    A = at::vec::fmadd(d0, x0, A);
    A = at::vec::fmadd(d1, x1, A);
    B = B + d0 + d1;
  }
  BwdSums<acc_t> s;
  s.A = hsum<acc_t>(A);
  s.B = hsum<acc_t>(B);
  s.T = hsum<acc_t>(T);
  for (; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t gi = static_cast<acc_t>(g[i]);
    acc_t d = gi;
    if (kTLU) {
      const acc_t y = xi * a + b;
      if (y >= t) {
        s.T += 0;
      } else {
        s.T += gi;
        d = 0;
      }
    }
    s.A += d * xi;
    s.B += d;
  }
  return s;
}

// dx = ca * dy + cx * x with ca = gamma * rstd, cx = -gamma * rstd^3 * A / L.
template <typename scalar_t, bool kTLU>
void backward_apply(
    const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n,
    typename VecIO<scalar_t>::acc_t a, typename VecIO<scalar_t>::acc_t b, typename VecIO<scalar_t>::acc_t t,
    typename VecIO<scalar_t>::acc_t ca, typename VecIO<scalar_t>::acc_t cx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const aVec av(a), bv(b), tv(t), cav(ca), cxv(cx), zero(0);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    aVec x0, x1, g0, g1;
    IO::load(x + i, x0, x1);
    IO::load(g + i, g0, g1);
    if (kTLU) {
      g0 = aVec::blendv(zero, g0, (x0 * av + bv) >= tv);
      g1 = aVec::blendv(zero, g1, (x1 * av + bv) >= tv);
    }
    IO::store(dx + i, at::vec::fmadd(g0, cav, x0 * cxv), at::vec::fmadd(g1, cav, x1 * cxv));
  }
  for (; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    acc_t d = static_cast<acc_t>(g[i]);
    if (kTLU && !(xi * a + b >= t)) {
      d = 0;
    }
    dx[i] = static_cast<scalar_t>(d * ca + xi * cx);
  }
}

// ---- NCHW drivers ---------------------------------------------------------------------------

template <typename scalar_t, bool kTLU>
void forward_nchw(
    const scalar_t* x, scalar_t* out, typename VecIO<scalar_t>::acc_t* rstd,
    const typename VecIO<scalar_t>::acc_t* w, const typename VecIO<scalar_t>::acc_t* bias,
    const typename VecIO<scalar_t>::acc_t* tau, typename VecIO<scalar_t>::acc_t eps_eff,
    int64_t P, int64_t C, int64_t L) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  if (P >= at::get_num_threads() || K <= 1) {
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
void backward_nchw(
    const scalar_t* g, const scalar_t* x, scalar_t* dx /* null: no grad_x */,
    const typename VecIO<scalar_t>::acc_t* rstd, const typename VecIO<scalar_t>::acc_t* w,
    const typename VecIO<scalar_t>::acc_t* bias, const typename VecIO<scalar_t>::acc_t* tau,
    typename VecIO<scalar_t>::acc_t* A, typename VecIO<scalar_t>::acc_t* B, typename VecIO<scalar_t>::acc_t* T,
    int64_t P, int64_t C, int64_t L) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  auto t_of = [&](int64_t c) { return kTLU ? tau[c] : acc_t(0); };
  // dx = ca * dy + cx * x; cx needs the whole plane's A.
  auto cx_of = [&](int64_t p, int64_t c) {
    const acc_t r = rstd[p];
    return L > 0 ? -w[c] * r * r * r * A[p] / static_cast<acc_t>(L) : acc_t(0);
  };
  if (P >= at::get_num_threads() || K <= 1) {
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
// Sample n is an (L, C) row-major matrix. Tasks are (n, block of rows); per-channel partial sums
// of each task go to their own slice of a buffer and are combined in task order.

template <typename scalar_t, bool kTLU>
void forward_nhwc(
    const scalar_t* x, scalar_t* out, typename VecIO<scalar_t>::acc_t* rstd,
    const typename VecIO<scalar_t>::acc_t* w, const typename VecIO<scalar_t>::acc_t* bias,
    const typename VecIO<scalar_t>::acc_t* tau, typename VecIO<scalar_t>::acc_t eps_eff,
    int64_t N, int64_t C, int64_t L) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const int64_t R = std::max<int64_t>(1, kChunk / C); // rows per task
  const int64_t K = divup(L, R);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (R * C));
  std::vector<acc_t> part(N * K * C);
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      acc_t* __restrict__ s = part.data() + u * C;
      std::fill(s, s + C, acc_t(0));
      for (int64_t l = k * R; l < std::min(L, (k + 1) * R); ++l) {
        const scalar_t* __restrict__ xr = x + (n * L + l) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(xr[c]);
          s[c] += v * v;
        }
      }
    }
  });
  std::vector<acc_t> scale(N * C);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ss(C);
    for (int64_t n = begin; n < end; ++n) {
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
  });
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      const acc_t* __restrict__ a = scale.data() + n * C;
      for (int64_t l = k * R; l < std::min(L, (k + 1) * R); ++l) {
        const scalar_t* __restrict__ xr = x + (n * L + l) * C;
        scalar_t* __restrict__ orow = out + (n * L + l) * C;
        for (int64_t c = 0; c < C; ++c) {
          acc_t y = static_cast<acc_t>(xr[c]) * a[c] + bias[c];
          if (kTLU) {
            y = y >= tau[c] ? y : tau[c];
          }
          orow[c] = static_cast<scalar_t>(y);
        }
      }
    }
  });
}

template <typename scalar_t, bool kTLU>
void backward_nhwc(
    const scalar_t* g, const scalar_t* x, scalar_t* dx /* null: no grad_x */,
    const typename VecIO<scalar_t>::acc_t* rstd, const typename VecIO<scalar_t>::acc_t* w,
    const typename VecIO<scalar_t>::acc_t* bias, const typename VecIO<scalar_t>::acc_t* tau,
    typename VecIO<scalar_t>::acc_t* A, typename VecIO<scalar_t>::acc_t* B, typename VecIO<scalar_t>::acc_t* T,
    int64_t N, int64_t C, int64_t L) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const int64_t R = std::max<int64_t>(1, kChunk / C);
  const int64_t K = divup(L, R);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (2 * R * C));
  std::vector<acc_t> scale(N * C);
  for (int64_t i = 0; i < N * C; ++i) {
    scale[i] = w[i % C] * rstd[i];
  }
  // part[u] holds A, B, T for C channels: 3 * C values per task.
  std::vector<acc_t> part(N * K * 3 * C);
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      acc_t* __restrict__ sA = part.data() + u * 3 * C;
      acc_t* __restrict__ sB = sA + C;
      acc_t* __restrict__ sT = sB + C;
      std::fill(sA, sA + 3 * C, acc_t(0));
      const acc_t* __restrict__ a = scale.data() + n * C;
      for (int64_t l = k * R; l < std::min(L, (k + 1) * R); ++l) {
        const scalar_t* __restrict__ xr = x + (n * L + l) * C;
        const scalar_t* __restrict__ gr = g + (n * L + l) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xi = static_cast<acc_t>(xr[c]);
          const acc_t gi = static_cast<acc_t>(gr[c]);
          acc_t d = gi;
          if (kTLU) {
            const bool pass = xi * a[c] + bias[c] >= tau[c];
            d = pass ? gi : acc_t(0);
            sT[c] += pass ? acc_t(0) : gi;
          }
          sA[c] += d * xi;
          sB[c] += d;
        }
      }
    }
  });
  std::vector<acc_t> cx(N * C);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* An = A + n * C;
      acc_t* Bn = B + n * C;
      acc_t* Tn = T + n * C;
      std::fill(An, An + C, acc_t(0));
      std::fill(Bn, Bn + C, acc_t(0));
      std::fill(Tn, Tn + C, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* s = part.data() + (n * K + k) * 3 * C;
        for (int64_t c = 0; c < C; ++c) {
          An[c] += s[c];
          Bn[c] += s[C + c];
          Tn[c] += s[2 * C + c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t r = rstd[n * C + c];
        cx[n * C + c] = L > 0 ? -w[c] * r * r * r * An[c] / static_cast<acc_t>(L) : acc_t(0);
      }
    }
  });
  if (dx == nullptr) {
    return;
  }
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / K, k = u % K;
      const acc_t* __restrict__ a = scale.data() + n * C;
      const acc_t* __restrict__ cxn = cx.data() + n * C;
      for (int64_t l = k * R; l < std::min(L, (k + 1) * R); ++l) {
        const scalar_t* __restrict__ xr = x + (n * L + l) * C;
        const scalar_t* __restrict__ gr = g + (n * L + l) * C;
        scalar_t* __restrict__ dr = dx + (n * L + l) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xi = static_cast<acc_t>(xr[c]);
          acc_t d = static_cast<acc_t>(gr[c]);
          if (kTLU) {
            d = xi * a[c] + bias[c] >= tau[c] ? d : acc_t(0);
          }
          dr[c] = static_cast<scalar_t>(d * a[c] + xi * cxn[c]);
        }
      }
    }
  });
}

// ---- op implementations -----------------------------------------------------------------------

double eps_eff_of(double eps, const std::optional<at::Tensor>& eps_l) {
  return eps_l.has_value() ? eps + std::abs(eps_l->item().toDouble()) : eps;
}

std::tuple<at::Tensor, at::Tensor> frn_forward_cpu(
    const at::Tensor& x_in,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    double eps,
    const std::optional<at::Tensor>& eps_l) {
  check_forward_args(x_in, weight, bias, tau, eps_l);
  TORCH_INTERNAL_ASSERT(x_in.device().is_cpu());
  const Layout layout = layout_of(x_in);
  const at::Tensor x = to_layout(x_in, layout);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  const at::ScalarType acc = acc_type_for(x.scalar_type());
  at::Tensor out = at::empty_like(x);
  at::Tensor rstd = at::empty({N, C}, x.options().dtype(acc));
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = bias.to(acc).contiguous();
  const at::Tensor t = tau.has_value() ? tau->to(acc).contiguous() : at::Tensor();
  const double eps_eff = eps_eff_of(eps, eps_l);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frn_forward_cpu", [&] {
    using acc_t = typename VecIO<scalar_t>::acc_t;
    const acc_t e = static_cast<acc_t>(eps_eff);
    const acc_t* tp = t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    auto run = [&](auto tlu) {
      constexpr bool kTLU = decltype(tlu)::value;
      if (layout == Layout::NHWC) {
        forward_nhwc<scalar_t, kTLU>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>(),
            w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), tp, e, N, C, L);
      } else {
        forward_nchw<scalar_t, kTLU>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>(),
            w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), tp, e, N * C, C, L);
      }
    };
    if (tp != nullptr) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frn_backward_cpu(
    const at::Tensor& grad_out_in,
    const at::Tensor& x_in,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& tau,
    const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& eps_l,
    bool grad_input) {
  check_backward_args(grad_out_in, x_in, weight, bias, tau, rstd_in, eps_l);
  TORCH_INTERNAL_ASSERT(x_in.device().is_cpu());
  const Layout layout = layout_of(x_in);
  const at::Tensor x = to_layout(x_in, layout);
  const at::Tensor g = to_layout(grad_out_in, layout);
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  const at::ScalarType acc = acc_type_for(x.scalar_type());
  at::Tensor grad_x = grad_input ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor A = at::empty({N, C}, x.options().dtype(acc));
  at::Tensor B = at::empty({N, C}, x.options().dtype(acc));
  at::Tensor T = at::empty({N, C}, x.options().dtype(acc));
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = bias.to(acc).contiguous();
  const at::Tensor t = tau.has_value() ? tau->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frn_backward_cpu", [&] {
    using acc_t = typename VecIO<scalar_t>::acc_t;
    const acc_t* tp = t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    scalar_t* dxp = grad_input ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto tlu) {
      constexpr bool kTLU = decltype(tlu)::value;
      auto fn = layout == Layout::NHWC ? backward_nhwc<scalar_t, kTLU> : backward_nchw<scalar_t, kTLU>;
      fn(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dxp, rstd.const_data_ptr<acc_t>(),
         w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), tp, A.mutable_data_ptr<acc_t>(),
         B.mutable_data_ptr<acc_t>(), T.mutable_data_ptr<acc_t>(), layout == Layout::NHWC ? N : N * C, C, L);
    };
    if (tp != nullptr) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  auto [grad_weight, grad_bias, grad_tau, grad_eps_l] =
      param_grads_from_plane_sums(A, B, T, rstd, weight, bias, tau, eps_l);
  return {grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l};
}

} // namespace
} // namespace frn_det

TORCH_LIBRARY_IMPL(frn_det, CPU, m) {
  m.impl("frn", &frn_det::frn_forward_cpu);
  m.impl("frn_backward", &frn_det::frn_backward_cpu);
}
