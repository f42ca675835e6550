// CUDA kernels of torch.ops.frn_det.frn / frn_backward (fp32 / fp16 / bf16 / fp64 input; fp32
// accumulation, fp64 for fp64).
//
// Paths (chosen per call from the shape; tests/test_frn_op.py keeps the table of which test reaches
// which path):
//  * NCHW, planes of <= kWarpPlaneMax elements (ROI heads: 7x7, 14x14, 28x28): one warp per plane,
//    8 planes per block; the plane is re-read from L1/L2 for the second pass.
//  * NCHW, larger planes and enough of them to fill the GPU: one 256-thread block per plane.
//    Both fused kernels use 16-byte vector loads when the plane size and pointers allow.
//  * NCHW with few large planes, and every channels_last input: a statistics kernel spread over
//    (plane or channel tile) x chunks of the plane writes one partial sum per chunk, a finalize
//    kernel adds each plane's partials in chunk order, then one element-wise kernel applies it.
//  * Opt-in (kernel_options().cuda_resident; written and compiled, not yet run on a GPU), NCHW:
//    resident spans of several small planes per block, and resident planes held by one block or a
//    thread-block cluster (sm_90+): each byte read from DRAM once (plan_of chooses).
// Deterministic: no atomics; every sum runs in an order fixed by the shape and by the GPU (the split
// path's chunk count from the SM count, the resident planes' blocks per plane from its shared memory
// sizes), so outputs and gradients are bitwise identical from run to run on GPUs of one model.
// Numerics: rstd uses correctly rounded division and square root (the build has no fast math, no
// denormal flush); y = x * a + b is a rounded multiply then a rounded add (no FMA), the arithmetic
// of the CPU kernels, so CPU and CUDA agree on which elements pass the TLU. A NaN y passes (stays
// NaN), as through torch.maximum.
// Every launch uses the current stream and is followed by C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>

#include "frn.h"

namespace frn_det {
namespace {

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr int64_t kWarpPlaneMax = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---- element-wise math, one definition for every kernel ----------------------------------------

// Correctly rounded operations, never contracted into an FMA, whatever the compiler flags.
#define FRN_ROUNDED_OPS(T, MUL, ADD, DIV, SQRT)                                  \
  __device__ __forceinline__ T mul_rn(T a, T b) { return MUL(a, b); }           \
  __device__ __forceinline__ T add_rn(T a, T b) { return ADD(a, b); }           \
  __device__ __forceinline__ T div_rn(T a, T b) { return DIV(a, b); }           \
  __device__ __forceinline__ T sqrt_rn(T v) { return SQRT(v); }
FRN_ROUNDED_OPS(float, __fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn)
FRN_ROUNDED_OPS(double, __dmul_rn, __dadd_rn, __ddiv_rn, __dsqrt_rn)
#undef FRN_ROUNDED_OPS

// y = x * a + b, rounded after the multiply (no FMA), as the CPU kernels compute it.
template <typename acc_t>
__device__ __forceinline__ acc_t affine(acc_t x, acc_t a, acc_t b) {
  return add_rn(mul_rn(x, a), b);
}

// Whether the gradient at y goes to y: not below tau (ties and NaN go to y). Without TLU, always.
template <typename acc_t>
__device__ __forceinline__ bool passes(acc_t y, acc_t t, bool tlu) {
  return !(tlu && y < t);
}

// The TLU max(y, tau), NaN y kept.
template <typename acc_t>
__device__ __forceinline__ acc_t tlu_of(acc_t y, acc_t t, bool tlu) {
  return passes(y, t, tlu) ? y : t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t rstd_from(acc_t sumsq, int64_t L, acc_t eps_eff) {
  const acc_t nu2 = L > 0 ? div_rn(sumsq, static_cast<acc_t>(L)) : acc_t(0);
  return div_rn(acc_t(1), sqrt_rn(add_rn(nu2, eps_eff)));
}

template <typename acc_t>
__device__ __forceinline__ acc_t eps_eff_of(acc_t eps, const acc_t* eps_l) {
  if (eps_l == nullptr) {
    return eps;
  }
  const acc_t e = *eps_l;
  return eps + (e < acc_t(0) ? -e : e);
}

// One element's share of the backward sums: s[0] = A (dy * x), s[1] = B (dy), s[2] = T (g where
// y < tau), dy = g where y passes.
template <typename acc_t>
__device__ __forceinline__ void accumulate(acc_t (&s)[3], acc_t xi, acc_t gi, acc_t a, acc_t b, acc_t t, bool tlu) {
  const bool pass = passes(affine(xi, a, b), t, tlu);
  const acc_t d = pass ? gi : acc_t(0);
  s[0] += d * xi;
  s[1] += d;
  s[2] += pass ? acc_t(0) : gi;
}

// dx = dy * a + x * cx with a = gamma * rstd, cx = -gamma * rstd^3 * A / L.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_x(acc_t xi, acc_t gi, acc_t a, acc_t b, acc_t t, bool tlu, acc_t cx) {
  const acc_t d = passes(affine(xi, a, b), t, tlu) ? gi : acc_t(0);
  return d * a + xi * cx;
}

template <typename acc_t>
__device__ __forceinline__ acc_t cx_of(acc_t w, acc_t r, acc_t A, int64_t L) {
  return L > 0 ? -w * r * r * r * A / static_cast<acc_t>(L) : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Sums kN values over groups of kTPP consecutive threads (a warp or the whole block), in an order
// fixed by the thread layout; every thread of the block must call it. smem holds kN * kBlock / kWarp.
template <int kTPP, int kN, typename acc_t>
__device__ __forceinline__ void group_sum(acc_t (&v)[kN], acc_t* smem) {
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    v[k] = warp_sum(v[k]);
  }
  if constexpr (kTPP > kWarp) {
    constexpr int kWarps = kBlock / kWarp;
    constexpr int kWarpsPerGroup = kTPP / kWarp;
    const int warp = threadIdx.x / kWarp;
    const int first = (warp / kWarpsPerGroup) * kWarpsPerGroup;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        smem[k * kWarps + warp] = v[k];
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      acc_t s = 0;
      for (int w = 0; w < kWarpsPerGroup; ++w) {
        s += smem[k * kWarps + first + w];
      }
      v[k] = s;
    }
    __syncthreads(); // smem is reused by the next call
  }
}

// What the kernels read and write (device pointers; tau / eps_l / dx null when absent).
template <typename scalar_t>
struct Data {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x;
  const scalar_t* g; // backward
  scalar_t* out; // forward: the output; backward: grad_x
  acc_t* rstd; // forward writes it, backward reads it
  const acc_t *w, *b, *tau, *eps_l;
  acc_t eps;
  acc_t *A, *B, *T; // backward: per-plane sums
};

// A pack's output (forward: the TLU of y = x * a + b) and grad_x, element by element.
template <typename scalar_t, int kVec, typename acc_t>
__device__ __forceinline__ Pack<scalar_t, kVec> output_pack(const Pack<scalar_t, kVec> xv, acc_t a, acc_t b, acc_t t,
                                                            bool tlu) {
  Pack<scalar_t, kVec> o;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    o.v[k] = static_cast<scalar_t>(tlu_of(affine(static_cast<acc_t>(xv.v[k]), a, b), t, tlu));
  }
  return o;
}

template <typename scalar_t, int kVec, typename acc_t>
__device__ __forceinline__ Pack<scalar_t, kVec> grad_x_pack(const Pack<scalar_t, kVec> xv, const Pack<scalar_t, kVec> gv,
                                                            acc_t a, acc_t b, acc_t t, bool tlu, acc_t cx) {
  Pack<scalar_t, kVec> o;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    o.v[k] = static_cast<scalar_t>(grad_x(static_cast<acc_t>(xv.v[k]), static_cast<acc_t>(gv.v[k]), a, b, t, tlu, cx));
  }
  return o;
}

// ---- fused per-plane kernels (NCHW) -----------------------------------------------------------
// The plane loops are unrolled by 4 so that each thread keeps several loads in flight.

template <typename scalar_t, int kTPP, int kVec>
__global__ void __launch_bounds__(kBlock) frn_forward_plane_kernel(Data<scalar_t> d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int kGroups = kBlock / kTPP;
  __shared__ acc_t smem[kBlock / kWarp];
  const int group = threadIdx.x / kTPP;
  const int lane = threadIdx.x % kTPP;
  const acc_t eps_eff = eps_eff_of(d.eps, d.eps_l);
  const bool tlu = d.tau != nullptr;
  const int64_t nvec = L / kVec; // the launcher picks kVec > 1 only when kVec divides L
  for (int64_t p0 = static_cast<int64_t>(blockIdx.x) * kGroups; p0 < P;
       p0 += static_cast<int64_t>(gridDim.x) * kGroups) { // block-uniform: group_sum may sync
    const int64_t p = p0 + group;
    const bool active = p < P;
    const pack_t* xp = reinterpret_cast<const pack_t*>(d.x + p * L);
    acc_t ss[1] = {acc_t(0)};
    if (active) {
#pragma unroll 4
      for (int64_t i = lane; i < nvec; i += kTPP) {
        const pack_t v = xp[i];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t f = static_cast<acc_t>(v.v[k]);
          ss[0] += f * f;
        }
      }
    }
    group_sum<kTPP, 1>(ss, smem);
    if (active) {
      const acc_t r = rstd_from(ss[0], L, eps_eff);
      if (lane == 0) {
        d.rstd[p] = r;
      }
      const int64_t c = p % C;
      const acc_t a = mul_rn(d.w[c], r), bb = d.b[c];
      const acc_t t = tlu ? d.tau[c] : acc_t(0);
      pack_t* op = reinterpret_cast<pack_t*>(d.out + p * L);
#pragma unroll 4
      for (int64_t i = lane; i < nvec; i += kTPP) {
        const pack_t v = xp[i];
        op[i] = output_pack(v, a, bb, t, tlu);
      }
    }
  }
}

template <typename scalar_t, int kTPP, int kVec>
__global__ void __launch_bounds__(kBlock) frn_backward_plane_kernel(Data<scalar_t> d, int64_t P, int64_t C, int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int kGroups = kBlock / kTPP;
  __shared__ acc_t smem[3 * (kBlock / kWarp)];
  const int group = threadIdx.x / kTPP;
  const int lane = threadIdx.x % kTPP;
  const int64_t nvec = L / kVec;
  const bool tlu = d.tau != nullptr;
  for (int64_t p0 = static_cast<int64_t>(blockIdx.x) * kGroups; p0 < P;
       p0 += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t p = p0 + group;
    const bool active = p < P;
    const int64_t c = active ? p % C : 0;
    const acc_t r = active ? d.rstd[p] : acc_t(0);
    const acc_t a = active ? mul_rn(d.w[c], r) : acc_t(0);
    const acc_t bb = active ? d.b[c] : acc_t(0);
    const acc_t t = active && tlu ? d.tau[c] : acc_t(0);
    const pack_t* xp = reinterpret_cast<const pack_t*>(d.x + p * L);
    const pack_t* gp = reinterpret_cast<const pack_t*>(d.g + p * L);
    acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)}; // A, B, T
    if (active) {
#pragma unroll 4
      for (int64_t i = lane; i < nvec; i += kTPP) {
        const pack_t xv = xp[i];
        const pack_t gv = gp[i];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          accumulate(s, static_cast<acc_t>(xv.v[k]), static_cast<acc_t>(gv.v[k]), a, bb, t, tlu);
        }
      }
    }
    group_sum<kTPP, 3>(s, smem);
    if (active) {
      if (lane == 0) {
        d.A[p] = s[0];
        d.B[p] = s[1];
        d.T[p] = s[2];
      }
      if (d.out != nullptr) {
        const acc_t cx = cx_of(d.w[c], r, s[0], L);
        pack_t* dp = reinterpret_cast<pack_t*>(d.out + p * L);
#pragma unroll 4
        for (int64_t i = lane; i < nvec; i += kTPP) {
          const pack_t xv = xp[i];
          const pack_t gv = gp[i];
          dp[i] = grad_x_pack(xv, gv, a, bb, t, tlu, cx);
        }
      }
    }
  }
}

// ---- resident planes (NCHW): one DRAM pass -----------------------------------------------------
// A plane (forward: x; backward: x and grad_out) is read from DRAM once into the shared memory of K
// blocks: one block (K = 1, any GPU) or a thread-block cluster (K = 2..8, sm_90+), each block holding
// one contiguous share of the plane's vectors. Each block sums its share; the K block sums are added
// in rank order through distributed shared memory, so every block of the cluster gets the same bits;
// then each block writes its share's output from shared memory. Forward moves 2S bytes and backward
// 3S, where the two-sweep kernels read each plane twice (3S and 5S) once it has left L2.
// Each thread reads back, in the second phase, exactly the shared-memory slots it wrote in the first:
// the plane's data needs no barrier between the phases or between planes.

// How a resident plane is split: K blocks per plane (a cluster when K > 1), `share` vectors each.
struct Resident {
  int64_t K, share;
};

// Adds the kN block sums of the K blocks of a cluster in rank order (identical in every block).
// block_part is this block's slot, read by the others; every thread of the cluster must call it.
template <bool kCluster, int kN, typename acc_t>
__device__ __forceinline__ void cluster_sum(acc_t (&s)[kN], acc_t* block_part, int64_t K) {
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        block_part[k] = s[k];
      }
    }
    cluster.sync(); // every block's part written (and visible cluster-wide)
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      acc_t total = 0;
      for (unsigned r = 0; r < static_cast<unsigned>(K); ++r) {
        total += *cluster.map_shared_rank(block_part + k, r);
      }
      s[k] = total;
    }
    cluster.sync(); // every part read before any block writes the next plane's, or exits
#else
    __trap(); // the launcher uses clusters on sm_90+ only
#endif
  }
}

// kN = 1: forward (x^2 sums, rstd, output); kN = 3: backward (A, B, T, grad_x; d.out is grad_x).
template <typename scalar_t, int kVec, int kN, bool kCluster>
__global__ void __launch_bounds__(kBlock) frn_resident_kernel(Data<scalar_t> d, int64_t P, int64_t C, int64_t L, Resident rs) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr bool kBwd = kN == 3;
  extern __shared__ __align__(16) unsigned char resident_smem[];
  __shared__ acc_t red[kN * (kBlock / kWarp)];
  __shared__ acc_t block_part[kN];
  pack_t* xs = reinterpret_cast<pack_t*>(resident_smem);
  pack_t* gs = xs + rs.share; // backward: grad_out's share after x's
  const bool tlu = d.tau != nullptr;
  const acc_t eps_eff = eps_eff_of(d.eps, d.eps_l);
  const int64_t rank = static_cast<int64_t>(blockIdx.x) % rs.K; // a 1-D cluster's rank
  const int64_t begin = rank * rs.share;
  const int64_t end = ::min(L / kVec, begin + rs.share); // the launcher picks kVec > 1 only when kVec divides L
  // Every block of a cluster takes the same planes (a cluster-uniform loop: cluster_sum syncs).
  for (int64_t p = static_cast<int64_t>(blockIdx.x) / rs.K; p < P; p += gridDim.x / rs.K) {
    const int64_t c = p % C;
    const pack_t* xp = reinterpret_cast<const pack_t*>(d.x + p * L);
    const pack_t* gp = reinterpret_cast<const pack_t*>(kBwd ? d.g + p * L : nullptr);
    acc_t r, a, bb = d.b[c], t = tlu ? d.tau[c] : acc_t(0);
    if constexpr (kBwd) {
      r = d.rstd[p];
      a = mul_rn(d.w[c], r);
    }
    acc_t s[kN] = {};
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
      const pack_t xv = xp[i];
      xs[i - begin] = xv;
      if constexpr (kBwd) {
        const pack_t gv = gp[i];
        gs[i - begin] = gv;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          accumulate(s, static_cast<acc_t>(xv.v[k]), static_cast<acc_t>(gv.v[k]), a, bb, t, tlu);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t f = static_cast<acc_t>(xv.v[k]);
          s[0] += f * f;
        }
      }
    }
    group_sum<kBlock, kN>(s, red);
    cluster_sum<kCluster, kN>(s, block_part, rs.K);
    const bool writes_stats = rank == 0 && threadIdx.x == 0;
    pack_t* op = reinterpret_cast<pack_t*>(d.out + p * L);
    if constexpr (kBwd) {
      if (writes_stats) {
        d.A[p] = s[0];
        d.B[p] = s[1];
        d.T[p] = s[2];
      }
      const acc_t cx = cx_of(d.w[c], r, s[0], L);
#pragma unroll 4
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
        op[i] = grad_x_pack(xs[i - begin], gs[i - begin], a, bb, t, tlu, cx);
      }
    } else {
      r = rstd_from(s[0], L, eps_eff);
      if (writes_stats) {
        d.rstd[p] = r;
      }
      a = mul_rn(d.w[c], r);
#pragma unroll 4
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
        op[i] = output_pack(xs[i - begin], a, bb, t, tlu);
      }
    }
  }
}

// ---- resident spans (NCHW, planes of <= kWarpPlaneMax elements) ---------------------------------
// A block takes G consecutive planes at a time: a span of G * L contiguous elements (G a multiple of
// the planes that make 16 bytes), loaded with 16-byte loads into shared memory; a warp per plane sums
// it there (lane-strided, then xor shuffles: the warp kernel's order, so the same bits as its scalar
// variant), then the block writes the span's output with 16-byte stores. Where the warp kernel reads
// planes whose size is not a multiple of 16 bytes (7x7 RoIs, 14x14 in fp16) with 2-4 byte loads,
// every load here is 16 bytes. Only the last span can end mid-vector: its tail goes element by element.
// Shared memory: per plane a, b, tau (backward also cx), rounded up to 16 bytes; then x's span
// (backward: then grad_out's).

// Bytes of the per-plane parameters at the start of a span's shared memory (16-byte multiple).
__host__ __device__ constexpr int64_t span_params_bytes(int64_t G, int64_t params, int64_t acc_size) {
  return (params * G * acc_size + 15) / 16 * 16;
}

template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kBlock) frn_span_kernel(Data<scalar_t> d, int64_t P, int64_t C, int64_t L, int64_t G) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using pack_t = Pack<scalar_t, kVec>;
  constexpr bool kBwd = kN == 3;
  constexpr int kParams = kBwd ? 4 : 3;
  extern __shared__ __align__(16) unsigned char span_smem[];
  acc_t* prm = reinterpret_cast<acc_t*>(span_smem); // prm[k * G + q]: a, b, tau (, cx) of plane q
  scalar_t* xs = reinterpret_cast<scalar_t*>(span_smem + span_params_bytes(G, kParams, sizeof(acc_t)));
  scalar_t* gs = xs + G * L; // backward; G * L * sizeof(scalar_t) is a multiple of 16
  const bool tlu = d.tau != nullptr;
  const acc_t eps_eff = eps_eff_of(d.eps, d.eps_l);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  // The output of one element of plane q of the span, from q's parameters.
  struct Params {
    acc_t a, b, t, cx;
  };
  auto params = [&](int q) {
    return Params{prm[q], prm[G + q], prm[2 * G + q], kBwd ? prm[3 * G + q] : acc_t(0)};
  };
  auto value = [&](scalar_t x, scalar_t g, const Params& p) -> scalar_t {
    if constexpr (kBwd) {
      return static_cast<scalar_t>(grad_x(static_cast<acc_t>(x), static_cast<acc_t>(g), p.a, p.b, p.t, tlu, p.cx));
    } else {
      return static_cast<scalar_t>(tlu_of(affine(static_cast<acc_t>(x), p.a, p.b), p.t, tlu));
    }
  };
  const int Li = static_cast<int>(L); // a span has under 2^31 elements (span_plan): 32-bit division
  for (int64_t p0 = static_cast<int64_t>(blockIdx.x) * G; p0 < P; p0 += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t np = ::min(G, P - p0), n = np * L, nv = n / kVec;
    const pack_t* xp = reinterpret_cast<const pack_t*>(d.x + p0 * L);
    const pack_t* gp = reinterpret_cast<const pack_t*>(kBwd ? d.g + p0 * L : nullptr);
    pack_t* xsv = reinterpret_cast<pack_t*>(xs);
    pack_t* gsv = reinterpret_cast<pack_t*>(gs);
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nv; v += kBlock) {
      xsv[v] = xp[v];
      if constexpr (kBwd) {
        gsv[v] = gp[v];
      }
    }
    for (int64_t e = nv * kVec + threadIdx.x; e < n; e += kBlock) {
      xs[e] = d.x[p0 * L + e];
      if constexpr (kBwd) {
        gs[e] = d.g[p0 * L + e];
      }
    }
    __syncthreads();
    for (int64_t q = warp; q < np; q += kBlock / kWarp) { // warp-uniform: full-mask shuffles
      const int64_t p = p0 + q, c = p % C;
      const acc_t bb = d.b[c], t = tlu ? d.tau[c] : acc_t(0);
      const scalar_t* xq = xs + q * L;
      acc_t r, a;
      if constexpr (kBwd) {
        r = d.rstd[p];
        a = mul_rn(d.w[c], r);
        acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)};
        const scalar_t* gq = gs + q * L;
        for (int64_t i = lane; i < L; i += kWarp) {
          accumulate(s, static_cast<acc_t>(xq[i]), static_cast<acc_t>(gq[i]), a, bb, t, tlu);
        }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          s[k] = warp_sum(s[k]);
        }
        if (lane == 0) {
          d.A[p] = s[0];
          d.B[p] = s[1];
          d.T[p] = s[2];
          prm[3 * G + q] = cx_of(d.w[c], r, s[0], L);
        }
      } else {
        acc_t ss = 0;
        for (int64_t i = lane; i < L; i += kWarp) {
          const acc_t f = static_cast<acc_t>(xq[i]);
          ss += f * f;
        }
        ss = warp_sum(ss);
        r = rstd_from(ss, L, eps_eff);
        a = mul_rn(d.w[c], r);
        if (lane == 0) {
          d.rstd[p] = r;
        }
      }
      if (lane == 0) {
        prm[q] = a;
        prm[G + q] = bb;
        prm[2 * G + q] = t;
      }
    }
    __syncthreads();
    pack_t* op = reinterpret_cast<pack_t*>(d.out + p0 * L);
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nv; v += kBlock) {
      // a 16-byte pack from shared memory; its elements' planes by counting, one division per pack
      const pack_t xv = xsv[v];
      const pack_t gv = kBwd ? gsv[v] : pack_t{};
      const int e = static_cast<int>(v) * kVec;
      int q = e / Li, r = e - q * Li;
      auto pq = params(q);
      pack_t o;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        o.v[k] = value(xv.v[k], gv.v[k], pq);
        if (k + 1 < kVec && ++r == Li) {
          r = 0;
          pq = params(++q);
        }
      }
      op[v] = o;
    }
    for (int64_t e = nv * kVec + threadIdx.x; e < n; e += kBlock) {
      d.out[p0 * L + e] = value(xs[e], kBwd ? gs[e] : scalar_t(0), params(static_cast<int>(e) / Li));
    }
    __syncthreads(); // the next span overwrites prm, xs and gs
  }
}

// ---- split path: partial sums per chunk, a fixed-order finalize, then an element-wise pass ------
// kN sums per plane: 1 (forward: x^2) or 3 (backward: A, B, T).

// The split path's extent: units (planes for NCHW, samples for NHWC), channels, plane size, and
// the elements (NCHW) or rows (NHWC) of one chunk.
struct Split {
  int64_t units, C, L, chunk;
};

// NCHW: blockIdx.y = plane, blockIdx.x = chunk; part is (P, chunks, kN).
template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kBlock) frn_stats_nchw_kernel(Data<scalar_t> d, typename Acc<scalar_t>::type* part, Split sp) {
  const int64_t P = sp.units, C = sp.C, L = sp.L, chunk = sp.chunk;
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t smem[kN * (kBlock / kWarp)];
  const bool tlu = d.tau != nullptr;
  const int64_t chunks = gridDim.x;
  for (int64_t p = blockIdx.y; p < P; p += gridDim.y) {
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
    const int64_t end = ::min(L, begin + chunk);
    const scalar_t* xp = d.x + p * L;
    acc_t s[kN] = {};
    if constexpr (kN == 3) {
      const int64_t c = p % C;
      const acc_t a = mul_rn(d.w[c], d.rstd[p]), bb = d.b[c];
      const acc_t t = tlu ? d.tau[c] : acc_t(0);
      const scalar_t* gp = d.g + p * L;
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
        accumulate(s, static_cast<acc_t>(xp[i]), static_cast<acc_t>(gp[i]), a, bb, t, tlu);
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
        const acc_t xi = static_cast<acc_t>(xp[i]);
        s[0] += xi * xi;
      }
    }
    group_sum<kBlock, kN>(s, smem);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        part[(p * chunks + blockIdx.x) * kN + k] = s[k];
      }
    }
  }
}

// NHWC: a (32 channels) x (8 rows) thread block walks a tile of 32 channels over a chunk of rows of
// one sample (warps read 32 consecutive channels of a row: coalesced); part is (N, chunks, kN, C).
constexpr int kTileC = 32;
constexpr int kTileRows = kBlock / kTileC;

template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kBlock) frn_stats_nhwc_kernel(Data<scalar_t> d, typename Acc<scalar_t>::type* part, Split sp) {
  const int64_t N = sp.units, C = sp.C, L = sp.L, rows_per_chunk = sp.chunk;
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t smem[kN][kTileRows][kTileC + 1];
  const int tx = threadIdx.x % kTileC;
  const int ty = threadIdx.x / kTileC;
  const int64_t chunks = gridDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + tx;
  const bool valid_c = c < C;
  const bool tlu = d.tau != nullptr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = ::min(L, row_begin + rows_per_chunk);
  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    acc_t s[kN] = {};
    if (valid_c) {
      if constexpr (kN == 3) {
        const acc_t a = mul_rn(d.w[c], d.rstd[n * C + c]), bb = d.b[c];
        const acc_t t = tlu ? d.tau[c] : acc_t(0);
        for (int64_t l = row_begin + ty; l < row_end; l += kTileRows) {
          const int64_t off = (n * L + l) * C + c;
          accumulate(s, static_cast<acc_t>(d.x[off]), static_cast<acc_t>(d.g[off]), a, bb, t, tlu);
        }
      } else {
        for (int64_t l = row_begin + ty; l < row_end; l += kTileRows) {
          const acc_t xi = static_cast<acc_t>(d.x[(n * L + l) * C + c]);
          s[0] += xi * xi;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      smem[k][ty][tx] = s[k];
    }
    __syncthreads();
    if (ty == 0 && valid_c) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        acc_t total = 0;
        for (int r = 0; r < kTileRows; ++r) {
          total += smem[k][r][tx];
        }
        part[((n * chunks + blockIdx.y) * kN + k) * C + c] = total;
      }
    }
    __syncthreads();
  }
}

// Adds each plane's partial sums in chunk order. Forward (kN 1): rstd = 1 / sqrt(sumsq / L + eps_eff);
// backward (kN 3): A, B, T.
template <typename acc_t, int kN, bool kNHWC>
__global__ void frn_finalize_kernel(
    const acc_t* __restrict__ part,
    acc_t* __restrict__ out0,
    acc_t* __restrict__ out1,
    acc_t* __restrict__ out2,
    const acc_t* __restrict__ eps_l,
    acc_t eps,
    int64_t P,
    int64_t C,
    int64_t L,
    int64_t chunks) {
  acc_t* outs[3] = {out0, out1, out2};
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < P;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = q / C, c = q % C;
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      acc_t s = 0;
      for (int64_t j = 0; j < chunks; ++j) {
        s += kNHWC ? part[((n * chunks + j) * kN + k) * C + c] : part[(q * chunks + j) * kN + k];
      }
      outs[k][q] = kN == 1 ? rstd_from(s, L, eps_eff_of(eps, eps_l)) : s;
    }
  }
}

// index_t is int32_t whenever the launcher can prove no overflow: 64-bit division is slow on GPUs.
template <bool kNHWC, typename index_t>
__device__ __forceinline__ void plane_and_channel(index_t i, index_t C, index_t L, index_t& p, index_t& c) {
  if constexpr (kNHWC) {
    c = i % C;
    p = (i / (L * C)) * C + c;
  } else {
    p = i / L;
    c = p % C;
  }
}

// The element-wise pass of the split path: the output (forward) or grad_x (kBwd) from the per-plane
// rstd (and A).
template <typename scalar_t, bool kBwd, bool kNHWC, typename index_t>
__global__ void frn_apply_kernel(Data<scalar_t> d, index_t numel, index_t C, index_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool tlu = d.tau != nullptr;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t p, c;
    plane_and_channel<kNHWC>(i, C, L, p, c);
    const acc_t r = d.rstd[p];
    const acc_t a = mul_rn(d.w[c], r);
    const acc_t t = tlu ? d.tau[c] : acc_t(0);
    const acc_t xi = static_cast<acc_t>(d.x[i]);
    if constexpr (kBwd) {
      const acc_t cx = cx_of(d.w[c], r, d.A[p], L);
      d.out[i] = static_cast<scalar_t>(grad_x(xi, static_cast<acc_t>(d.g[i]), a, d.b[c], t, tlu, cx));
    } else {
      d.out[i] = static_cast<scalar_t>(tlu_of(affine(xi, a, d.b[c]), t, tlu));
    }
  }
}

// ---- parameter gradients: per channel, sums over the batch in a fixed order ------------------

// A block takes kParamTile channels (threadIdx.x: coalesced rows) with kParamRows threads per
// channel, thread y summing the rows n = y, y + kParamRows, ...; the rows' partial sums then add in
// a fixed tree. (One thread per channel walking all N rows was latency-bound: 0.3 ms for the
// backward of a 512-RoI batch on an H200, 12x its memory floor.)
constexpr int kParamTile = 32, kParamRows = 16;
static_assert((kParamRows & (kParamRows - 1)) == 0, "frn_param_grads_kernel's tree needs power-of-two rows");

// gw = sum_n A * rstd, gb = sum_n B, gt = sum_n T; eps_part[c] = sum_n -0.5 * gamma * A * rstd^3.
template <typename acc_t>
__global__ void __launch_bounds__(kParamTile * kParamRows) frn_param_grads_kernel(
    const acc_t* __restrict__ A,
    const acc_t* __restrict__ B,
    const acc_t* __restrict__ T,
    const acc_t* __restrict__ rstd,
    const acc_t* __restrict__ w,
    acc_t* __restrict__ gw,
    acc_t* __restrict__ gb,
    acc_t* __restrict__ gt,
    acc_t* __restrict__ eps_part,
    int64_t N,
    int64_t C) {
  __shared__ acc_t smem[4][kParamRows][kParamTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kParamTile; c0 < C;
       c0 += static_cast<int64_t>(gridDim.x) * kParamTile) {
    const int64_t c = c0 + tx;
    acc_t sw = 0, sb = 0, st = 0, se = 0;
    if (c < C) {
      const acc_t wc = w[c];
      for (int64_t n = ty; n < N; n += kParamRows) {
        const int64_t q = n * C + c;
        // A == 0 (an empty plane, or no gradient): no contribution, also where rstd is inf (eps 0)
        const acc_t ar = A[q] == acc_t(0) ? acc_t(0) : A[q] * rstd[q];
        sw += ar;
        sb += B[q];
        st += T[q];
        se += acc_t(-0.5) * wc * ar * rstd[q] * rstd[q];
      }
    }
    smem[0][ty][tx] = sw;
    smem[1][ty][tx] = sb;
    smem[2][ty][tx] = st;
    smem[3][ty][tx] = se;
    __syncthreads();
    for (int stride = kParamRows / 2; stride > 0; stride >>= 1) {
      if (ty < stride) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          smem[k][ty][tx] += smem[k][ty + stride][tx];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && c < C) {
      gw[c] = smem[0][0][tx];
      gb[c] = smem[1][0][tx];
      gt[c] = smem[2][0][tx];
      eps_part[c] = smem[3][0][tx];
    }
    __syncthreads();  // the next tile reuses smem
  }
}

// ge = sign(eps_l) * sum_c eps_part[c] (eps_eff = eps + |eps_l|; 0 at 0 like autograd's abs), one
// block, fixed order: strided per-thread sums, then a tree over the threads.
static_assert((kBlock & (kBlock - 1)) == 0, "frn_eps_grad_kernel's tree needs a power-of-two block");

template <typename acc_t>
__global__ void __launch_bounds__(kBlock) frn_eps_grad_kernel(
    const acc_t* __restrict__ eps_part, const acc_t* __restrict__ eps_l, acc_t* __restrict__ ge, int64_t C) {
  __shared__ acc_t smem[kBlock];
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < C; c += kBlock) {
    s += eps_part[c];
  }
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      smem[threadIdx.x] += smem[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t e = *eps_l;
    *ge = smem[0] * (e > acc_t(0) ? acc_t(1) : (e < acc_t(0) ? acc_t(-1) : acc_t(0)));
  }
}

// ---- launchers -----------------------------------------------------------------------------

int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The largest 1-D grid a launch uses: a few waves per SM, or the tests' lower cap.
int64_t grid_cap() {
  const int64_t cap = static_cast<int64_t>(num_sms()) * 32;
  const int64_t test_cap = test_limits().max_grid;
  return test_cap > 0 ? std::min(cap, test_cap) : cap;
}

// Grid y / z dimensions: CUDA's limit of 65535, or the tests' lower cap.
int64_t grid_yz(int64_t n) {
  const int64_t test_cap = test_limits().max_grid;
  return std::max<int64_t>(1, std::min<int64_t>(n, test_cap > 0 ? std::min<int64_t>(65535, test_cap) : 65535));
}

int64_t elementwise_grid(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>((numel + kBlock - 1) / kBlock, grid_cap()));
}

// The grid-stride loop's last increment must not overflow index_t either.
bool fits_int32(int64_t numel, int64_t grid) {
  return !test_limits().force_int64 &&
      numel + grid * kBlock < static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Resident blocks per SM the plan aims for (several planes' loads in flight on each SM), a bound on a
// resident block's static shared memory (red and block_part: under 256 bytes; sm_90's resource
// usage adds its 1 KB reserved), the portable cluster size.
constexpr int64_t kResidentBlocksPerSm = 3;
constexpr int64_t kResidentStaticSmem = 2048;
constexpr int64_t kMaxCluster = 8;

// Which kernels a call runs: the path, whether its loads are 16 bytes wide, and for resident
// planes the blocks per plane, for resident spans the planes per block (span); smem: the dynamic
// shared memory per block of either.
struct Plan {
  enum Kind { kWarpPlane, kBlockPlane, kSplit, kResident, kSpan } kind;
  bool vec = false;
  Resident rs{1, 0};
  int64_t span = 0;
  int64_t smem = 0;
};

// Shared memory per block: what the resident plans aim for (kResidentBlocksPerSm blocks per SM) and
// the most one block can have.
int64_t resident_target_smem() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return static_cast<int64_t>(prop->sharedMemPerMultiprocessor) / kResidentBlocksPerSm -
      static_cast<int64_t>(prop->reservedSharedMemPerBlock) - kResidentStaticSmem;
}

int64_t block_max_smem() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) - kResidentStaticSmem;
}

// Whether the cluster kernels run on the current GPU: an sm_90+ GPU, and code for it compiled for
// sm_90+ (a build for older architectures only, JIT-compiled from their PTX, has the cluster variant
// as a trap). Cached per device.
bool cluster_kernels_run_here() {
  static std::mutex mutex;
  static std::map<int, bool> cache;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = cache.find(device); it != cache.end()) {
    return it->second;
  }
  bool runs = at::cuda::getCurrentDeviceProperties()->major >= 9;
  if (runs) {
    cudaFuncAttributes attr = {};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, frn_resident_kernel<float, 4, 1, true>));
    runs = attr.ptxVersion >= 90;
  }
  return cache[device] = runs;
}

// Resident planes of L elements read in vectors of `vec` elements of `elem` bytes, `tensors` planes
// held (forward 1, backward 2): the fewest blocks per plane whose share fits the per-block target,
// up to one block, or a cluster of kMaxCluster on sm_90+ (whose shares may then fill a block's whole
// shared memory). K = 0: the plane does not fit.
Resident resident_plan(int64_t L, int64_t vec, int64_t elem, int64_t tensors, int64_t& smem) {
  const int64_t block_max = block_max_smem();
  const int64_t target = std::min(block_max, resident_target_smem());
  const int64_t max_k = cluster_kernels_run_here() ? kMaxCluster : 1;
  const int64_t nvec = L / vec, slot = vec * elem * tensors;
  for (int64_t K = 1; K <= max_k; ++K) {
    const int64_t share = (nvec + K - 1) / K;
    if (share * slot <= target || (K == max_k && share * slot <= block_max)) {
      smem = share * slot;
      return Resident{K, share};
    }
  }
  return Resident{0, 0};
}

// Elements a resident span aims for, and the most planes it takes (1x1 planes).
constexpr int64_t kSpanElems = 2048;
constexpr int64_t kSpanPlanesMax = 512;

// Planes per resident span for planes of 1..kWarpPlaneMax elements: about kSpanElems elements, fewer
// where that would leave SMs without spans, a multiple of the planes that make 16 bytes; 0 when the
// span's shared memory (params, then `tensors` spans of x / grad_out) does not fit a block.
int64_t span_plan(int64_t P, int64_t L, int64_t elem, int64_t acc_size, int64_t tensors, int64_t& smem) {
  const int64_t whole = 16 / std::gcd<int64_t>(L * elem, 16); // planes per 16-byte multiple
  const int64_t spread = (P + 2 * num_sms() - 1) / (2 * num_sms()); // at least 2 spans per SM
  int64_t G = std::clamp<int64_t>(std::min((kSpanElems + L - 1) / L, spread), 1, kSpanPlanesMax);
  G = (G + whole - 1) / whole * whole;
  smem = span_params_bytes(G, tensors + 2, acc_size) + tensors * G * L * elem; // a, b, tau (, cx) per plane
  return smem <= block_max_smem() ? G : 0;
}

// The path of a call: NHWC always splits; NCHW planes of up to kWarpPlaneMax elements take a warp per
// plane, or resident spans; larger planes resident planes when they fit on chip, else a block per
// plane when every SM gets a plane, else the split path. Resident planes and spans only when enabled
// (kernel_options), in backward only with grad_x (else one sweep is all it reads), spans only with
// 16-byte aligned pointers. aligned: every pointer of the call is 16-byte aligned.
Plan plan_of(Layout layout, int64_t P, int64_t L, at::ScalarType dtype, bool aligned, bool backward, bool grad_input) {
  const int64_t elem = c10::elementSize(dtype);
  const int64_t vec_elems = 16 / elem;
  const bool vec = aligned && L % vec_elems == 0;
  if (layout != Layout::NCHW) {
    return {Plan::kSplit};
  }
  const bool resident = kernel_options().cuda_resident && (!backward || grad_input);
  const int64_t tensors = backward ? 2 : 1;
  Plan plan{Plan::kWarpPlane, vec};
  if (L <= kWarpPlaneMax) {
    if (resident && aligned && L > 0) {
      const int64_t G = span_plan(P, L, elem, c10::elementSize(acc_type_for(dtype)), tensors, plan.smem);
      if (G > 0) {
        plan.kind = Plan::kSpan;
        plan.span = G;
      }
    }
    return plan;
  }
  if (resident) {
    plan.rs = resident_plan(L, vec ? vec_elems : 1, elem, tensors, plan.smem);
    // At least half the SMs get a block: with fewer, the split path spreads each plane over more SMs
    // (3 sweeps, but the whole GPU's bandwidth; an estimate, for the GPU check to measure).
    if (plan.rs.K > 0 && 2 * P * plan.rs.K >= num_sms()) {
      plan.kind = Plan::kResident;
      return plan;
    }
  }
  plan.kind = P >= 2 * static_cast<int64_t>(num_sms()) ? Plan::kBlockPlane : Plan::kSplit;
  return plan;
}

// Chunking of the split path: about 4 blocks per SM in total, chunks of at least min_chunk.
int64_t split_chunks(int64_t units, int64_t len, int64_t min_chunk) {
  const int64_t want = std::max<int64_t>(1, (4 * static_cast<int64_t>(num_sms()) + units - 1) / std::max<int64_t>(units, 1));
  return std::max<int64_t>(1, std::min<int64_t>(want, (len + min_chunk - 1) / min_chunk));
}

// Launches the fused per-plane kernel Kernel<scalar_t, threads per plane, vector width>: a warp per
// plane up to kWarpPlaneMax elements, else a block; 16-byte loads when L and every pointer allow.
template <typename scalar_t, template <typename, int, int> class Kernel>
struct PlaneLaunch {
  static void run(const Data<scalar_t>& d, int64_t P, int64_t C, int64_t L, bool vec, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (L <= kWarpPlaneMax) {
      constexpr int kGroups = kBlock / kWarp;
      const int64_t grid = std::min<int64_t>((P + kGroups - 1) / kGroups, grid_cap());
      vec ? Kernel<scalar_t, kWarp, kVec>::launch(grid, stream, d, P, C, L)
          : Kernel<scalar_t, kWarp, 1>::launch(grid, stream, d, P, C, L);
    } else {
      const int64_t grid = std::min<int64_t>(P, grid_cap());
      vec ? Kernel<scalar_t, kBlock, kVec>::launch(grid, stream, d, P, C, L)
          : Kernel<scalar_t, kBlock, 1>::launch(grid, stream, d, P, C, L);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename scalar_t, int kTPP, int kVec>
struct ForwardPlane {
  static void launch(int64_t grid, cudaStream_t s, const Data<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
    frn_forward_plane_kernel<scalar_t, kTPP, kVec><<<grid, kBlock, 0, s>>>(d, P, C, L);
  }
};

template <typename scalar_t, int kTPP, int kVec>
struct BackwardPlane {
  static void launch(int64_t grid, cudaStream_t s, const Data<scalar_t>& d, int64_t P, int64_t C, int64_t L) {
    frn_backward_plane_kernel<scalar_t, kTPP, kVec><<<grid, kBlock, 0, s>>>(d, P, C, L);
  }
};

// Lets `kernel` take `smem` bytes of dynamic shared memory: by default a kernel's dynamic and static
// shared memory together may not exceed 48 KB. It raises the kernel's limit to the most any plan
// takes, never to `smem` itself, so that one thread's call cannot lower another's between its call
// and its launch.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t smem) {
  if (smem + kResidentStaticSmem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(block_max_smem())));
  }
}

// The launch configuration of `blocks` blocks of kBlock threads with `smem` bytes of dynamic shared
// memory each, in 1-D clusters of K blocks (K = 1: no cluster attribute, which GPUs before sm_90
// reject). Not copyable: the configuration points at its own attribute.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute cluster_dim = {};

  ClusterLaunch(int64_t blocks, int64_t K, int64_t smem, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(blocks));
    config.blockDim = dim3(kBlock);
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.stream = stream;
    cluster_dim.id = cudaLaunchAttributeClusterDimension;
    cluster_dim.val.clusterDim.x = static_cast<unsigned>(K);
    cluster_dim.val.clusterDim.y = 1;
    cluster_dim.val.clusterDim.z = 1;
    config.attrs = &cluster_dim;
    config.numAttrs = K > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Clusters of K blocks (K = 1: single blocks) of `kernel`, `smem` bytes of dynamic shared memory
// each, that the current GPU runs at once: the runtime's occupancy query (registers, shared memory,
// and for clusters the GPCs, MPS and MIG limits), cached per device, kernel, K and smem. The first
// query of a kernel on a device also raises its shared-memory limit (allow_smem) for every launch.
template <typename Kernel>
int64_t active_clusters(Kernel kernel, int64_t K, int64_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int64_t, int64_t>, int64_t> cache;
  const auto key = std::make_tuple(static_cast<int>(c10::cuda::current_device()),
                                   reinterpret_cast<const void*>(kernel), K, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = cache.find(key); it != cache.end()) {
    return it->second;
  }
  allow_smem(kernel, smem);
  int n = 0;
  if (K > 1) {
    const ClusterLaunch launch(K, K, smem, nullptr);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &launch.config));
  } else {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kBlock, static_cast<size_t>(smem)));
    n *= num_sms();
  }
  return cache[key] = n;
}

// Launches the resident kernel (kN 1: forward, 3: backward) with the plan's K blocks per plane as a
// cluster when K > 1, on a grid of as many clusters as fit on the GPU at once (each loops over planes).
// False, launching nothing, where no cluster fits (MPS or MIG limits).
template <typename scalar_t, int kN>
bool run_resident(const Data<scalar_t>& d, int64_t P, int64_t C, int64_t L, const Plan& plan, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t K = plan.rs.K;
  auto kernel = plan.vec ? (K > 1 ? frn_resident_kernel<scalar_t, kVec, kN, true> : frn_resident_kernel<scalar_t, kVec, kN, false>)
                         : (K > 1 ? frn_resident_kernel<scalar_t, 1, kN, true> : frn_resident_kernel<scalar_t, 1, kN, false>);
  const int64_t fit = active_clusters(kernel, K, plan.smem);
  if (fit == 0) {
    return false;
  }
  const int64_t clusters = std::min({P, fit, grid_cap()});
  const ClusterLaunch launch(clusters * K, K, plan.smem, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, d, P, C, L, plan.rs));
  return true;
}

// Launches the span kernel: as many blocks as fit on the GPU at once, each looping over spans.
template <typename scalar_t, int kN>
void run_span(const Data<scalar_t>& d, int64_t P, int64_t C, int64_t L, const Plan& plan, cudaStream_t stream) {
  auto kernel = frn_span_kernel<scalar_t, kN>;
  const int64_t spans = (P + plan.span - 1) / plan.span;
  const int64_t grid = std::min({spans, std::max<int64_t>(1, active_clusters(kernel, 1, plan.smem)), grid_cap()});
  kernel<<<grid, kBlock, plan.smem, stream>>>(d, P, C, L, plan.span);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The split path: statistics with partial sums, the finalize kernel into out0..out2, then the
// element-wise pass (skipped when apply is false: backward without grad_x).
template <typename scalar_t, int kN>
void run_split(const FrnArgs& a, const Data<scalar_t>& d, typename Acc<scalar_t>::type* out0,
               typename Acc<scalar_t>::type* out1, typename Acc<scalar_t>::type* out2, bool apply,
               cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = a.N, C = a.C, L = a.L, P = N * C;
  const bool nhwc = a.layout == Layout::NHWC;
  int64_t chunks;
  at::Tensor part;
  if (nhwc) {
    const int64_t ctiles = (C + kTileC - 1) / kTileC;
    chunks = split_chunks(ctiles * N, L, 64);
    part = at::empty({N * chunks * kN * C}, a.x.options().dtype(a.acc));
    const dim3 grid(static_cast<unsigned>(ctiles), static_cast<unsigned>(chunks), static_cast<unsigned>(grid_yz(N)));
    frn_stats_nhwc_kernel<scalar_t, kN><<<grid, kBlock, 0, stream>>>(
        d, part.mutable_data_ptr<acc_t>(), Split{N, C, L, (L + chunks - 1) / chunks});
  } else {
    chunks = split_chunks(P, L, 2048);
    part = at::empty({P * chunks * kN}, a.x.options().dtype(a.acc));
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(grid_yz(P)));
    frn_stats_nchw_kernel<scalar_t, kN><<<grid, kBlock, 0, stream>>>(
        d, part.mutable_data_ptr<acc_t>(), Split{P, C, L, (L + chunks - 1) / chunks});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto finalize = nhwc ? frn_finalize_kernel<acc_t, kN, true> : frn_finalize_kernel<acc_t, kN, false>;
  finalize<<<elementwise_grid(P), kBlock, 0, stream>>>(
      part.const_data_ptr<acc_t>(), out0, out1, out2, d.eps_l, d.eps, P, C, L, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t numel = a.x.numel();
  if (!apply || numel == 0) {
    return;
  }
  const int64_t grid = elementwise_grid(numel);
  auto launch = [&](auto nhwc_t, auto index) {
    using index_t = decltype(index);
    frn_apply_kernel<scalar_t, kN == 3, decltype(nhwc_t)::value, index_t><<<grid, kBlock, 0, stream>>>(
        d, static_cast<index_t>(numel), static_cast<index_t>(C), static_cast<index_t>(L));
  };
  const bool small = fits_int32(numel, grid);
  if (nhwc) {
    small ? launch(std::true_type{}, int32_t{}) : launch(std::true_type{}, int64_t{});
  } else {
    small ? launch(std::false_type{}, int32_t{}) : launch(std::false_type{}, int64_t{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs a call's plan: forward (kN 1, PlaneKernel ForwardPlane) or backward (kN 3, BackwardPlane);
// the split path's finalize writes out0..out2 and applies the result only when `apply`. Resident
// planes that find no room on the GPU at launch run the split path.
template <typename scalar_t, int kN, template <typename, int, int> class PlaneKernel>
void run_plan(const FrnArgs& a, const Data<scalar_t>& d, const Plan& plan, typename Acc<scalar_t>::type* out0,
              typename Acc<scalar_t>::type* out1, typename Acc<scalar_t>::type* out2, bool apply, cudaStream_t stream) {
  const int64_t P = a.N * a.C;
  switch (plan.kind) {
    case Plan::kResident:
      if (run_resident<scalar_t, kN>(d, P, a.C, a.L, plan, stream)) {
        return;
      }
      [[fallthrough]];
    case Plan::kSplit:
      run_split<scalar_t, kN>(a, d, out0, out1, out2, apply, stream);
      return;
    case Plan::kSpan:
      run_span<scalar_t, kN>(d, P, a.C, a.L, plan, stream);
      return;
    default:
      PlaneLaunch<scalar_t, PlaneKernel>::run(d, P, a.C, a.L, plan.vec, stream);
  }
}

template <typename scalar_t>
Data<scalar_t> data_of(const FrnArgs& a, scalar_t* out, typename Acc<scalar_t>::type* rstd) {
  using acc_t = typename Acc<scalar_t>::type;
  Data<scalar_t> d{};
  d.x = a.x.const_data_ptr<scalar_t>();
  d.g = a.grad_out.defined() ? a.grad_out.const_data_ptr<scalar_t>() : nullptr;
  d.out = out;
  d.rstd = rstd;
  d.w = a.weight.const_data_ptr<acc_t>();
  d.b = a.bias.const_data_ptr<acc_t>();
  d.tau = a.tau.defined() ? a.tau.const_data_ptr<acc_t>() : nullptr;
  d.eps_l = a.eps_l.defined() ? a.eps_l.const_data_ptr<acc_t>() : nullptr;
  d.eps = static_cast<acc_t>(a.eps);
  return d;
}

ForwardOut frn_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& tau, double eps, const std::optional<at::Tensor>& eps_l) {
  const FrnArgs a = prepare_forward(x, weight, bias, tau, eps, eps_l);
  TORCH_INTERNAL_ASSERT(a.x.is_cuda());
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t P = a.N * a.C;
  at::Tensor out = at::empty_like(a.x, memory_format_of(a.layout));
  at::Tensor rstd = at::empty({a.N, a.C}, a.x.options().dtype(a.acc));
  if (P == 0) {
    return {out, rstd};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_forward_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const Data<scalar_t> d = data_of<scalar_t>(a, out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>());
    const Plan plan = plan_of(a.layout, P, a.L, a.x.scalar_type(), aligned16(d.x) && aligned16(d.out), false, false);
    run_plan<scalar_t, 1, ForwardPlane>(a, d, plan, d.rstd, nullptr, nullptr, true, stream);
  });
  return {out, rstd};
}

// The CUDA parameter-gradient epilogue from the per-plane sums: two small kernels, no host sync.
ParamGrads param_grads_cuda(const FrnArgs& a, const at::Tensor& A, const at::Tensor& B, const at::Tensor& T,
                            cudaStream_t stream) {
  const auto opts = a.x.options().dtype(a.acc);
  at::Tensor gw = at::empty({a.C}, opts), gb = at::empty({a.C}, opts), gt = at::empty({a.C}, opts);
  // ge: written by frn_eps_grad_kernel where eps_l is learned, else unused (no fill kernel)
  at::Tensor eps_part = at::empty({a.C}, opts), ge = a.eps_l.defined() ? at::empty({}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(a.acc, "frn_param_grads_cuda", [&] {
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((a.C + kParamTile - 1) / kParamTile, grid_cap()));
    frn_param_grads_kernel<scalar_t><<<grid, dim3(kParamTile, kParamRows), 0, stream>>>(
        A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(), T.const_data_ptr<scalar_t>(),
        a.rstd.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(),
        gb.mutable_data_ptr<scalar_t>(), gt.mutable_data_ptr<scalar_t>(), eps_part.mutable_data_ptr<scalar_t>(),
        a.N, a.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (a.eps_l.defined()) {
      frn_eps_grad_kernel<scalar_t><<<1, kBlock, 0, stream>>>(
          eps_part.const_data_ptr<scalar_t>(), a.eps_l.const_data_ptr<scalar_t>(), ge.mutable_data_ptr<scalar_t>(), a.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return to_param_dtypes(a, gw, gb, gt, ge);
}

BackwardOut frn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, const std::optional<at::Tensor>& tau, const at::Tensor& rstd,
                              const std::optional<at::Tensor>& eps_l, bool grad_input) {
  const FrnArgs a = prepare_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input);
  TORCH_INTERNAL_ASSERT(a.x.is_cuda());
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t P = a.N * a.C;
  const auto opts = a.x.options().dtype(a.acc);
  at::Tensor grad_x = a.grad_input ? at::empty_like(a.x, memory_format_of(a.layout)) : at::empty({0}, a.x.options());
  // Every entry is written: by the plane kernels, or by the finalize kernel of the split path.
  at::Tensor A = at::empty({a.N, a.C}, opts), B = at::empty({a.N, a.C}, opts), T = at::empty({a.N, a.C}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frn_backward_cuda", [&] {
      using acc_t = typename Acc<scalar_t>::type;
      scalar_t* dx = a.grad_input ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      Data<scalar_t> d = data_of<scalar_t>(a, dx, const_cast<acc_t*>(a.rstd.const_data_ptr<acc_t>()));
      d.A = A.mutable_data_ptr<acc_t>();
      d.B = B.mutable_data_ptr<acc_t>();
      d.T = T.mutable_data_ptr<acc_t>();
      const bool aligned = aligned16(d.x) && aligned16(d.g) && (dx == nullptr || aligned16(dx));
      const Plan plan = plan_of(a.layout, P, a.L, a.x.scalar_type(), aligned, true, dx != nullptr);
      run_plan<scalar_t, 3, BackwardPlane>(a, d, plan, d.A, d.B, d.T, dx != nullptr, stream);
    });
  } else {
    A.zero_();
    B.zero_();
    T.zero_();
  }
  auto [gw, gb, gt, ge] = param_grads_cuda(a, A, B, T, stream);
  return {grad_x, gw, gb, gt, ge};
}

// The plan frn (backward: frn_backward with grad_x) runs for x, its tensors 16-byte aligned.
std::string cuda_plan(const at::Tensor& x, bool backward) {
  TORCH_CHECK_VALUE(x.dim() == 4, "_cuda_plan: x must be 4D (N, C, H, W), got ", x.dim(), "D");
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan plan = plan_of(layout_of(x), x.size(0) * x.size(1), x.size(2) * x.size(3), x.scalar_type(), true,
                            backward, true);
  switch (plan.kind) {
    case Plan::kWarpPlane:
      return "warp";
    case Plan::kBlockPlane:
      return "block";
    case Plan::kSplit:
      return "split";
    case Plan::kSpan:
      return "span:" + std::to_string(plan.span);
    default:
      return "resident:" + std::to_string(plan.rs.K);
  }
}

} // namespace
} // namespace frn_det

// This backend's kernels for the ops defined in frn.cpp.
TORCH_LIBRARY_IMPL(frn_det, CUDA, m) {
  m.impl("frn", TORCH_FN(frn_det::frn_forward_cuda));
  m.impl("frn_backward", TORCH_FN(frn_det::frn_backward_cuda));
  m.impl("_cuda_plan", TORCH_FN(frn_det::cuda_plan));
}
