// CUDA kernels of torch.ops.frn_det.frn / frn_backward (fp32 / fp16 / bf16 / fp64 input; fp32
// accumulation, fp64 for fp64).
//
// Paths (chosen per call from the shape):
//  * NCHW, planes of <= kWarpPlaneMax elements (ROI heads: 7x7, 14x14, 28x28): one warp per plane,
//    8 planes per block; the plane is re-read from L1/L2 for the second pass.
//  * NCHW, larger planes and enough of them to fill the GPU: one 256-thread block per plane,
//    16-byte vector loads when the plane size and pointers allow.
//  * NCHW with few large planes, and every channels_last input: a statistics kernel spread over
//    (plane or channel tile) x chunks of the plane accumulates into per-plane sums with atomics,
//    then one elementwise kernel applies the result. The atomics make the fp32 sums' rounding
//    order-dependent (run-to-run differences at the last ulp on this path only).
// Every launch uses the current stream and is followed by C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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

__device__ __forceinline__ float fma_acc(float a, float b, float c) {
  return fmaf(a, b, c);
}
__device__ __forceinline__ double fma_acc(double a, double b, double c) {
  return fma(a, b, c);
}
__device__ __forceinline__ float sqrt_acc(float v) {
  return sqrtf(v);
}
__device__ __forceinline__ double sqrt_acc(double v) {
  return sqrt(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t rstd_from(acc_t sumsq, int64_t L, acc_t eps_eff) {
  const acc_t nu2 = L > 0 ? sumsq / static_cast<acc_t>(L) : acc_t(0);
  return acc_t(1) / sqrt_acc(nu2 + eps_eff);
}

template <typename acc_t>
__device__ __forceinline__ acc_t eps_eff_of(acc_t eps, const acc_t* eps_l) {
  if (eps_l == nullptr) {
    return eps;
  }
  const acc_t e = *eps_l;
  return eps + (e < acc_t(0) ? -e : e);
}

// y = x * a + b written as one explicit fma in forward and backward, so that the TLU mask
// recomputed in backward matches forward bit for bit (ties y == tau go to y).
template <typename acc_t>
__device__ __forceinline__ acc_t affine(acc_t x, acc_t a, acc_t b) {
  return fma_acc(x, a, b);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Sums kN values over groups of kTPP consecutive threads (a warp or the whole block); every
// thread of the block must call it. smem holds kN * (kBlock / kWarp) values.
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

// ---- fused per-plane kernels (NCHW) -----------------------------------------------------------
// The plane loops are unrolled by 4 so that each thread keeps several loads in flight.

template <typename scalar_t, int kTPP, int kVec>
__global__ void __launch_bounds__(kBlock) frn_forward_plane_kernel(
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ out,
    typename Acc<scalar_t>::type* __restrict__ rstd,
    const typename Acc<scalar_t>::type* __restrict__ w,
    const typename Acc<scalar_t>::type* __restrict__ b,
    const typename Acc<scalar_t>::type* __restrict__ tau, // null: no TLU
    const typename Acc<scalar_t>::type* __restrict__ eps_l, // null: fixed eps
    typename Acc<scalar_t>::type eps,
    int64_t P,
    int64_t C,
    int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int kGroups = kBlock / kTPP;
  __shared__ acc_t smem[kBlock / kWarp];
  const int group = threadIdx.x / kTPP;
  const int lane = threadIdx.x % kTPP;
  const acc_t eps_eff = eps_eff_of(eps, eps_l);
  const int64_t nvec = L / kVec; // the launcher picks kVec > 1 only when kVec divides L
  for (int64_t p0 = static_cast<int64_t>(blockIdx.x) * kGroups; p0 < P;
       p0 += static_cast<int64_t>(gridDim.x) * kGroups) { // block-uniform: group_sum may sync
    const int64_t p = p0 + group;
    const bool active = p < P;
    const pack_t* xp = reinterpret_cast<const pack_t*>(x + p * L);
    acc_t ss[1] = {acc_t(0)};
    if (active) {
#pragma unroll 4
      for (int64_t i = lane; i < nvec; i += kTPP) {
        const pack_t v = xp[i];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t f = static_cast<acc_t>(v.v[k]);
          ss[0] = fma_acc(f, f, ss[0]);
        }
      }
    }
    group_sum<kTPP, 1>(ss, smem);
    if (active) {
      const acc_t r = rstd_from(ss[0], L, eps_eff);
      if (lane == 0) {
        rstd[p] = r;
      }
      const int64_t c = p % C;
      const acc_t a = w[c] * r, bb = b[c];
      const bool tlu = tau != nullptr;
      const acc_t t = tlu ? tau[c] : acc_t(0);
      pack_t* op = reinterpret_cast<pack_t*>(out + p * L);
#pragma unroll 4
      for (int64_t i = lane; i < nvec; i += kTPP) {
        const pack_t v = xp[i];
        pack_t o;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t y = affine(static_cast<acc_t>(v.v[k]), a, bb);
          o.v[k] = static_cast<scalar_t>(tlu && !(y >= t) ? t : y); // NaN y gives t, as the reference
        }
        op[i] = o;
      }
    }
  }
}

template <typename scalar_t, int kTPP, int kVec>
__global__ void __launch_bounds__(kBlock) frn_backward_plane_kernel(
    const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ dx, // null: sums only
    const typename Acc<scalar_t>::type* __restrict__ rstd,
    const typename Acc<scalar_t>::type* __restrict__ w,
    const typename Acc<scalar_t>::type* __restrict__ b,
    const typename Acc<scalar_t>::type* __restrict__ tau,
    typename Acc<scalar_t>::type* __restrict__ A,
    typename Acc<scalar_t>::type* __restrict__ B,
    typename Acc<scalar_t>::type* __restrict__ T,
    int64_t P,
    int64_t C,
    int64_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int kGroups = kBlock / kTPP;
  __shared__ acc_t smem[3 * (kBlock / kWarp)];
  const int group = threadIdx.x / kTPP;
  const int lane = threadIdx.x % kTPP;
  const int64_t nvec = L / kVec;
  const bool tlu = tau != nullptr;
  for (int64_t p0 = static_cast<int64_t>(blockIdx.x) * kGroups; p0 < P;
       p0 += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t p = p0 + group;
    const bool active = p < P;
    const int64_t c = active ? p % C : 0;
    const acc_t r = active ? rstd[p] : acc_t(0);
    const acc_t a = active ? w[c] * r : acc_t(0);
    const acc_t bb = active ? b[c] : acc_t(0);
    const acc_t t = active && tlu ? tau[c] : acc_t(0);
    const pack_t* xp = reinterpret_cast<const pack_t*>(x + p * L);
    const pack_t* gp = reinterpret_cast<const pack_t*>(g + p * L);
    acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)}; // A, B, T
    if (active) {
#pragma unroll 4
      for (int64_t i = lane; i < nvec; i += kTPP) {
        const pack_t xv = xp[i];
        const pack_t gv = gp[i];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t xi = static_cast<acc_t>(xv.v[k]);
          const acc_t gi = static_cast<acc_t>(gv.v[k]);
          const bool pass = !tlu || affine(xi, a, bb) >= t;
          const acc_t d = pass ? gi : acc_t(0);
          s[0] = fma_acc(d, xi, s[0]);
          s[1] += d;
          s[2] += pass ? acc_t(0) : gi;
        }
      }
    }
    group_sum<kTPP, 3>(s, smem);
    if (active) {
      if (lane == 0) {
        A[p] = s[0];
        B[p] = s[1];
        T[p] = s[2];
      }
      if (dx != nullptr) {
        // dx = a * dy + cx * x, cx = -gamma * rstd^3 * A / L
        const acc_t cx = L > 0 ? -w[c] * r * r * r * s[0] / static_cast<acc_t>(L) : acc_t(0);
        pack_t* dp = reinterpret_cast<pack_t*>(dx + p * L);
#pragma unroll 4
        for (int64_t i = lane; i < nvec; i += kTPP) {
          const pack_t xv = xp[i];
          const pack_t gv = gp[i];
          pack_t o;
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const acc_t xi = static_cast<acc_t>(xv.v[k]);
            const acc_t gi = static_cast<acc_t>(gv.v[k]);
            const acc_t d = (!tlu || affine(xi, a, bb) >= t) ? gi : acc_t(0);
            o.v[k] = static_cast<scalar_t>(fma_acc(d, a, xi * cx));
          }
          dp[i] = o;
        }
      }
    }
  }
}

// ---- split path: statistics spread over many blocks, then an elementwise pass ------------------

// NCHW: blockIdx.y = plane, blockIdx.x = chunk of the plane; sums of x^2 (kBwd: A, B, T) are
// atomically added to the per-plane accumulators acc0..acc2 (zeroed by the launcher).
template <typename scalar_t, bool kBwd>
__global__ void __launch_bounds__(kBlock) frn_stats_nchw_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ g, // kBwd only
    const typename Acc<scalar_t>::type* __restrict__ rstd, // kBwd only
    const typename Acc<scalar_t>::type* __restrict__ w,
    const typename Acc<scalar_t>::type* __restrict__ b,
    const typename Acc<scalar_t>::type* __restrict__ tau,
    typename Acc<scalar_t>::type* __restrict__ acc0,
    typename Acc<scalar_t>::type* __restrict__ acc1,
    typename Acc<scalar_t>::type* __restrict__ acc2,
    int64_t P,
    int64_t C,
    int64_t L,
    int64_t chunk) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kN = kBwd ? 3 : 1;
  __shared__ acc_t smem[kN * (kBlock / kWarp)];
  const bool tlu = tau != nullptr;
  for (int64_t p = blockIdx.y; p < P; p += gridDim.y) {
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
    const int64_t end = ::min(L, begin + chunk);
    const scalar_t* xp = x + p * L;
    acc_t s[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      s[k] = acc_t(0);
    }
    if constexpr (kBwd) {
      const int64_t c = p % C;
      const acc_t a = w[c] * rstd[p], bb = b[c];
      const acc_t t = tlu ? tau[c] : acc_t(0);
      const scalar_t* gp = g + p * L;
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
        const acc_t xi = static_cast<acc_t>(xp[i]);
        const acc_t gi = static_cast<acc_t>(gp[i]);
        const bool pass = !tlu || affine(xi, a, bb) >= t;
        const acc_t d = pass ? gi : acc_t(0);
        s[0] = fma_acc(d, xi, s[0]);
        s[1] += d;
        s[kN - 1] += pass ? acc_t(0) : gi;
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
        const acc_t xi = static_cast<acc_t>(xp[i]);
        s[0] = fma_acc(xi, xi, s[0]);
      }
    }
    group_sum<kBlock, kN>(s, smem);
    if (threadIdx.x == 0) {
      atomicAdd(acc0 + p, s[0]);
      if constexpr (kBwd) {
        atomicAdd(acc1 + p, s[1]);
        atomicAdd(acc2 + p, s[kN - 1]);
      }
    }
  }
}

// NHWC: a (32 channels) x (8 rows) thread block walks a tile of 32 channels over a chunk of rows of
// one sample; warps read 32 consecutive channels of a row (coalesced).
constexpr int kTileC = 32;
constexpr int kTileRows = kBlock / kTileC;

template <typename scalar_t, bool kBwd>
__global__ void __launch_bounds__(kBlock) frn_stats_nhwc_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ g,
    const typename Acc<scalar_t>::type* __restrict__ rstd,
    const typename Acc<scalar_t>::type* __restrict__ w,
    const typename Acc<scalar_t>::type* __restrict__ b,
    const typename Acc<scalar_t>::type* __restrict__ tau,
    typename Acc<scalar_t>::type* __restrict__ acc0,
    typename Acc<scalar_t>::type* __restrict__ acc1,
    typename Acc<scalar_t>::type* __restrict__ acc2,
    int64_t N,
    int64_t C,
    int64_t L,
    int64_t rows_per_chunk) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kN = kBwd ? 3 : 1;
  __shared__ acc_t smem[kN][kTileRows][kTileC + 1];
  const int tx = threadIdx.x % kTileC;
  const int ty = threadIdx.x / kTileC;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + tx;
  const bool valid_c = c < C;
  const bool tlu = tau != nullptr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = ::min(L, row_begin + rows_per_chunk);
  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    acc_t s[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      s[k] = acc_t(0);
    }
    if (valid_c) {
      if constexpr (kBwd) {
        const acc_t a = w[c] * rstd[n * C + c], bb = b[c];
        const acc_t t = tlu ? tau[c] : acc_t(0);
        for (int64_t l = row_begin + ty; l < row_end; l += kTileRows) {
          const int64_t off = (n * L + l) * C + c;
          const acc_t xi = static_cast<acc_t>(x[off]);
          const acc_t gi = static_cast<acc_t>(g[off]);
          const bool pass = !tlu || affine(xi, a, bb) >= t;
          const acc_t d = pass ? gi : acc_t(0);
          s[0] = fma_acc(d, xi, s[0]);
          s[1] += d;
          s[kN - 1] += pass ? acc_t(0) : gi;
        }
      } else {
        for (int64_t l = row_begin + ty; l < row_end; l += kTileRows) {
          const acc_t xi = static_cast<acc_t>(x[(n * L + l) * C + c]);
          s[0] = fma_acc(xi, xi, s[0]);
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
        acc_t* dst = k == 0 ? acc0 : (k == 1 ? acc1 : acc2);
        atomicAdd(dst + n * C + c, total);
      }
    }
    __syncthreads();
  }
}

// rstd = 1 / sqrt(sumsq / L + eps_eff), in place over the accumulated sums.
template <typename acc_t>
__global__ void frn_finalize_rstd_kernel(acc_t* __restrict__ rstd, const acc_t* __restrict__ eps_l, acc_t eps, int64_t P, int64_t L) {
  const acc_t eps_eff = eps_eff_of(eps, eps_l);
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    rstd[p] = rstd_from(rstd[p], L, eps_eff);
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

template <typename scalar_t, bool kNHWC, typename index_t>
__global__ void frn_forward_apply_kernel(
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ out,
    const typename Acc<scalar_t>::type* __restrict__ rstd,
    const typename Acc<scalar_t>::type* __restrict__ w,
    const typename Acc<scalar_t>::type* __restrict__ b,
    const typename Acc<scalar_t>::type* __restrict__ tau,
    index_t numel,
    index_t C,
    index_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool tlu = tau != nullptr;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t p, c;
    plane_and_channel<kNHWC>(i, C, L, p, c);
    const acc_t y = affine(static_cast<acc_t>(x[i]), w[c] * rstd[p], b[c]);
    out[i] = static_cast<scalar_t>(tlu && !(y >= tau[c]) ? tau[c] : y);
  }
}

template <typename scalar_t, bool kNHWC, typename index_t>
__global__ void frn_backward_apply_kernel(
    const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ dx,
    const typename Acc<scalar_t>::type* __restrict__ rstd,
    const typename Acc<scalar_t>::type* __restrict__ A,
    const typename Acc<scalar_t>::type* __restrict__ w,
    const typename Acc<scalar_t>::type* __restrict__ b,
    const typename Acc<scalar_t>::type* __restrict__ tau,
    index_t numel,
    index_t C,
    index_t L) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool tlu = tau != nullptr;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t p, c;
    plane_and_channel<kNHWC>(i, C, L, p, c);
    const acc_t r = rstd[p];
    const acc_t a = w[c] * r;
    const acc_t cx = -w[c] * r * r * r * A[p] / static_cast<acc_t>(L); // numel > 0 implies L > 0
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t gi = static_cast<acc_t>(g[i]);
    const acc_t d = (!tlu || affine(xi, a, b[c]) >= tau[c]) ? gi : acc_t(0);
    dx[i] = static_cast<scalar_t>(fma_acc(d, a, xi * cx));
  }
}

// ---- launchers -----------------------------------------------------------------------------

int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

int64_t elementwise_grid(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>((numel + kBlock - 1) / kBlock, static_cast<int64_t>(num_sms()) * 32));
}

// The grid-stride loop's last increment must not overflow index_t either.
bool fits_int32(int64_t numel, int64_t grid) {
  return numel + grid * kBlock < static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

template <typename scalar_t>
bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Fused per-plane kernels pay off when every SM gets a plane (or a warp's worth of small planes).
bool use_plane_kernels(Layout layout, int64_t P, int64_t L) {
  if (layout != Layout::NCHW) {
    return false;
  }
  return L <= kWarpPlaneMax || P >= 2 * static_cast<int64_t>(num_sms());
}

// Chunking of the split path: about 4 blocks per SM in total, chunks of at least 2048 elements.
int64_t split_chunks(int64_t units, int64_t len, int64_t min_chunk) {
  const int64_t want = std::max<int64_t>(1, (4 * static_cast<int64_t>(num_sms()) + units - 1) / std::max<int64_t>(units, 1));
  return std::max<int64_t>(1, std::min<int64_t>(want, (len + min_chunk - 1) / min_chunk));
}

// The CUDA parameter-gradient epilogue, from the per-plane sums A = sum(dy * x), B = sum(dy),
// T = sum(g where y < tau) ((N, C), accumulation dtype), with tensor ops (no host sync).
ParamGrads param_grads_cuda(const FrnArgs& a, const at::Tensor& A, const at::Tensor& B, const at::Tensor& T) {
  // dL/dgamma = sum dy * x_hat = sum_n rstd * A;  dL/dbeta = sum_n B;  dL/dtau = sum_n T.
  const at::Tensor A_rstd = A.mul(a.rstd);
  at::Tensor ge = at::zeros({}, A.options());
  if (a.eps_l.defined()) {
    // dL/d(eps_eff) = sum over planes of -0.5 * sum_plane(dx_hat * x) * rstd^3, dx_hat = gamma * dy;
    // eps_eff = eps + |eps_l| so d(eps_eff)/d(eps_l) = sign(eps_l) (0 at 0, as autograd's abs).
    const at::Tensor d_eps_eff = A_rstd.mul(a.rstd).mul(a.rstd).mul(a.weight.reshape({1, -1})).sum().mul(-0.5);
    ge = d_eps_eff.mul(a.eps_l.sign().reshape({}));
  }
  return to_param_dtypes(a, A_rstd.sum(0), B.sum(0), T.sum(0), ge);
}

ForwardOut frn_forward_cuda(const FrnArgs& args) {
  const double eps = args.eps;
  TORCH_INTERNAL_ASSERT(args.x.is_cuda());
  const c10::cuda::CUDAGuard guard(args.x.device());
  const Layout layout = args.layout;
  const at::Tensor& x = args.x;
  const int64_t N = args.N, C = args.C, L = args.L, P = N * C;
  at::Tensor out = at::empty_like(x, memory_format_of(layout));
  at::Tensor rstd = at::empty({N, C}, x.options().dtype(args.acc));
  if (P == 0) {
    return {out, rstd};
  }
  const at::Tensor &w = args.weight, &b = args.bias, &t = args.tau, &e = args.eps_l;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frn_forward_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* tp = t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    const acc_t* ep = e.defined() ? e.const_data_ptr<acc_t>() : nullptr;
    const acc_t eps_acc = static_cast<acc_t>(eps);
    if (use_plane_kernels(layout, P, L)) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = L % kVec == 0 && aligned16<scalar_t>(xp) && aligned16<scalar_t>(op);
      if (L <= kWarpPlaneMax) {
        constexpr int kGroups = kBlock / kWarp;
        const int64_t grid = std::min<int64_t>((P + kGroups - 1) / kGroups, static_cast<int64_t>(num_sms()) * 32);
        if (vec) {
          frn_forward_plane_kernel<scalar_t, kWarp, kVec><<<grid, kBlock, 0, stream>>>(xp, op, rp, wp, bp, tp, ep, eps_acc, P, C, L);
        } else {
          frn_forward_plane_kernel<scalar_t, kWarp, 1><<<grid, kBlock, 0, stream>>>(xp, op, rp, wp, bp, tp, ep, eps_acc, P, C, L);
        }
      } else {
        const int64_t grid = std::min<int64_t>(P, static_cast<int64_t>(num_sms()) * 32);
        if (vec) {
          frn_forward_plane_kernel<scalar_t, kBlock, kVec><<<grid, kBlock, 0, stream>>>(xp, op, rp, wp, bp, tp, ep, eps_acc, P, C, L);
        } else {
          frn_forward_plane_kernel<scalar_t, kBlock, 1><<<grid, kBlock, 0, stream>>>(xp, op, rp, wp, bp, tp, ep, eps_acc, P, C, L);
        }
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    rstd.zero_(); // accumulates sum(x^2) first
    if (layout == Layout::NCHW) {
      const int64_t chunks = split_chunks(P, L, 2048);
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(P, 65535)));
      frn_stats_nchw_kernel<scalar_t, false><<<grid, kBlock, 0, stream>>>(
          xp, nullptr, nullptr, wp, bp, tp, rp, nullptr, nullptr, P, C, L, (L + chunks - 1) / chunks);
    } else {
      const int64_t ctiles = (C + kTileC - 1) / kTileC;
      const int64_t chunks = split_chunks(ctiles * N, L, 64);
      const dim3 grid(static_cast<unsigned>(ctiles), static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(N, 65535)));
      frn_stats_nhwc_kernel<scalar_t, false><<<grid, kBlock, 0, stream>>>(
          xp, nullptr, nullptr, wp, bp, tp, rp, nullptr, nullptr, N, C, L, (L + chunks - 1) / chunks);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    frn_finalize_rstd_kernel<acc_t><<<elementwise_grid(P), kBlock, 0, stream>>>(rp, ep, eps_acc, P, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = x.numel();
    if (numel == 0) {
      return;
    }
    const int64_t grid = elementwise_grid(numel);
    auto launch = [&](auto nhwc, auto index) {
      using index_t = decltype(index);
      frn_forward_apply_kernel<scalar_t, decltype(nhwc)::value, index_t><<<grid, kBlock, 0, stream>>>(
          xp, op, rp, wp, bp, tp, static_cast<index_t>(numel), static_cast<index_t>(C), static_cast<index_t>(L));
    };
    const bool small = fits_int32(numel, grid);
    if (layout == Layout::NHWC) {
      small ? launch(std::true_type{}, int32_t{}) : launch(std::true_type{}, int64_t{});
    } else {
      small ? launch(std::false_type{}, int32_t{}) : launch(std::false_type{}, int64_t{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, rstd};
}

BackwardOut frn_backward_cuda(const FrnArgs& args) {
  const bool grad_input = args.grad_input;
  TORCH_INTERNAL_ASSERT(args.x.is_cuda());
  const c10::cuda::CUDAGuard guard(args.x.device());
  const Layout layout = args.layout;
  const at::Tensor &x = args.x, &g = args.grad_out, &rstd = args.rstd;
  const int64_t N = args.N, C = args.C, L = args.L, P = N * C;
  const at::ScalarType acc = args.acc;
  at::Tensor grad_x = grad_input ? at::empty_like(x, memory_format_of(layout)) : at::empty({0}, x.options());
  const bool plane_kernels = use_plane_kernels(layout, P, L);
  // The split path accumulates with atomics into zeroed buffers; the plane kernels write each entry.
  auto alloc = [&] { return plane_kernels ? at::empty({N, C}, x.options().dtype(acc)) : at::zeros({N, C}, x.options().dtype(acc)); };
  at::Tensor A = alloc(), B = alloc(), T = alloc();
  if (P > 0) {
    const at::Tensor &w = args.weight, &b = args.bias, &t = args.tau;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frn_backward_cuda", [&] {
      using acc_t = typename Acc<scalar_t>::type;
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* dxp = grad_input ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      const acc_t* rp = rstd.const_data_ptr<acc_t>();
      const acc_t* wp = w.const_data_ptr<acc_t>();
      const acc_t* bp = b.const_data_ptr<acc_t>();
      const acc_t* tp = t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
      acc_t* Ap = A.mutable_data_ptr<acc_t>();
      acc_t* Bp = B.mutable_data_ptr<acc_t>();
      acc_t* Tp = T.mutable_data_ptr<acc_t>();
      if (plane_kernels) {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = L % kVec == 0 && aligned16<scalar_t>(xp) && aligned16<scalar_t>(gp) &&
            (dxp == nullptr || aligned16<scalar_t>(dxp));
        if (L <= kWarpPlaneMax) {
          constexpr int kGroups = kBlock / kWarp;
          const int64_t grid = std::min<int64_t>((P + kGroups - 1) / kGroups, static_cast<int64_t>(num_sms()) * 32);
          if (vec) {
            frn_backward_plane_kernel<scalar_t, kWarp, kVec><<<grid, kBlock, 0, stream>>>(gp, xp, dxp, rp, wp, bp, tp, Ap, Bp, Tp, P, C, L);
          } else {
            frn_backward_plane_kernel<scalar_t, kWarp, 1><<<grid, kBlock, 0, stream>>>(gp, xp, dxp, rp, wp, bp, tp, Ap, Bp, Tp, P, C, L);
          }
        } else {
          const int64_t grid = std::min<int64_t>(P, static_cast<int64_t>(num_sms()) * 32);
          if (vec) {
            frn_backward_plane_kernel<scalar_t, kBlock, kVec><<<grid, kBlock, 0, stream>>>(gp, xp, dxp, rp, wp, bp, tp, Ap, Bp, Tp, P, C, L);
          } else {
            frn_backward_plane_kernel<scalar_t, kBlock, 1><<<grid, kBlock, 0, stream>>>(gp, xp, dxp, rp, wp, bp, tp, Ap, Bp, Tp, P, C, L);
          }
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      if (layout == Layout::NCHW) {
        const int64_t chunks = split_chunks(P, L, 2048);
        const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(P, 65535)));
        frn_stats_nchw_kernel<scalar_t, true><<<grid, kBlock, 0, stream>>>(
            xp, gp, rp, wp, bp, tp, Ap, Bp, Tp, P, C, L, (L + chunks - 1) / chunks);
      } else {
        const int64_t ctiles = (C + kTileC - 1) / kTileC;
        const int64_t chunks = split_chunks(ctiles * N, L, 64);
        const dim3 grid(static_cast<unsigned>(ctiles), static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(N, 65535)));
        frn_stats_nhwc_kernel<scalar_t, true><<<grid, kBlock, 0, stream>>>(
            xp, gp, rp, wp, bp, tp, Ap, Bp, Tp, N, C, L, (L + chunks - 1) / chunks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t numel = x.numel();
      if (dxp == nullptr || numel == 0) {
        return;
      }
      const int64_t grid = elementwise_grid(numel);
      auto launch = [&](auto nhwc, auto index) {
        using index_t = decltype(index);
        frn_backward_apply_kernel<scalar_t, decltype(nhwc)::value, index_t><<<grid, kBlock, 0, stream>>>(
            gp, xp, dxp, rp, Ap, wp, bp, tp, static_cast<index_t>(numel), static_cast<index_t>(C), static_cast<index_t>(L));
      };
      const bool small = fits_int32(numel, grid);
      if (layout == Layout::NHWC) {
        small ? launch(std::true_type{}, int32_t{}) : launch(std::true_type{}, int64_t{});
      } else {
        small ? launch(std::false_type{}, int32_t{}) : launch(std::false_type{}, int64_t{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [grad_weight, grad_bias, grad_tau, grad_eps_l] = param_grads_cuda(args, A, B, T);
  return {grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l};
}

[[maybe_unused]] const bool kRegistered = register_kernels(c10::DeviceType::CUDA, &frn_forward_cuda, &frn_backward_cuda);

} // namespace
} // namespace frn_det
