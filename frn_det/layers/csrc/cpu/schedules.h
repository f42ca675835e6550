// The parallel schedules of both ops' CPU kernels (frn_kernel.cpp, frn_centered_kernel.cpp): how a
// batch is cut into tasks and in which order the tasks' partial statistics are combined. Each op
// supplies its per-run work as callables; the schedule is the same for both, and it combines partials
// in a fixed order (chunk order within a plane, row-block order within a sample), so results do not
// depend on the thread count. Each task runs through run_task (cpu_common.h): AVX2 where active.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_common.h"

namespace frn_det {
namespace cpu {

// NCHW: P planes of L contiguous elements, each read in chunks of kChunk.
//   stats(p, off, len) -> S: the statistics of elements [off, off + len) (absolute offsets) of plane p;
//   merge(S& into, const S& part): appends a chunk's statistics (into starts value-initialised);
//   finish(p, const S&): called once per plane with the whole plane's statistics;
//   apply(p, off, len): the element-wise pass over [off, off + len) of plane p, after finish(p)
//   (skipped when !with_apply).
// One task per plane (read once, re-read from cache), or, when splits_planes(P, L), the chunks of
// all planes in parallel, finished serially, then applied in parallel. passes: how many arrays of
// L elements a plane's task reads (its grain).
template <typename S, typename Stats, typename Merge, typename Finish, typename Apply>
void schedule_planes(int64_t P, int64_t L, int64_t passes, bool with_apply, const Stats& stats, const Merge& merge,
                     const Finish& finish, const Apply& apply) {
  const int64_t K = divup(L, kChunk);
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, L - k * kChunk); };
  if (!splits_planes(P, L)) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(passes * L, 1));
    at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
      run_task([&] {
        for (int64_t p = begin; p < end; ++p) {
          S s{};
          for (int64_t k = 0; k < K; ++k) {
            merge(s, stats(p, p * L + k * kChunk, chunk_len(k)));
          }
          finish(p, s);
          if (with_apply) {
            apply(p, p * L, L);
          }
        }
      });
    });
    return;
  }
  std::vector<S> part(P * K);
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    run_task([&] {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t p = u / K, k = u % K;
        part[u] = stats(p, p * L + k * kChunk, chunk_len(k));
      }
    });
  });
  for (int64_t p = 0; p < P; ++p) {
    S s{};
    for (int64_t k = 0; k < K; ++k) {
      merge(s, part[p * K + k]);
    }
    finish(p, s);
  }
  if (!with_apply) {
    return;
  }
  at::parallel_for(0, P * K, 1, [&](int64_t begin, int64_t end) {
    run_task([&] {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t p = u / K, k = u % K;
        apply(p, p * L + k * kChunk, chunk_len(k));
      }
    });
  });
}

// NHWC (channels_last): N samples, each an (L, C) row-major matrix, with `width` statistics per
// channel (width * C values of acc_t per sample, zeroed before use).
//   rows(n, l0, l1, acc_t* s): accumulates the statistics of rows [l0, l1) of sample n into s;
//   merge(acc_t* into, int64_t rows_into, const acc_t* part, int64_t rows_part): appends a row
//   block's statistics to those of the rows before it;
//   finish(n, const acc_t* s): called once per sample with its statistics;
//   apply(n, l0, l1): the element-wise pass over rows [l0, l1) of sample n, after finish(n)
//   (skipped when !with_apply).
// A sample of at most kSampleFuse elements is one task (statistics, then the pass, while it is in
// cache); larger samples are cut into blocks of kChunk / C rows, whose partial statistics go to
// their own slice of a buffer and are merged serially in block order (N * K * width * C values, a
// fraction of the data: a parallel region there costs more than it saves).
template <typename acc_t, typename Rows, typename Merge, typename Finish, typename Apply>
void schedule_samples(int64_t N, int64_t C, int64_t L, int64_t width, int64_t passes, bool with_apply,
                      const Rows& rows, const Merge& merge, const Finish& finish, const Apply& apply) {
  const int64_t S = width * C;
  if (fuses_samples(L, C)) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(passes * L * C, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(S);
      run_task([&] {
        for (int64_t n = begin; n < end; ++n) {
          std::fill(s.begin(), s.end(), acc_t(0));
          rows(n, int64_t(0), L, s.data());
          finish(n, s.data());
          if (with_apply) {
            apply(n, int64_t(0), L);
          }
        }
      });
    });
    return;
  }
  const int64_t R = std::max<int64_t>(1, kChunk / C); // rows per task
  const int64_t K = divup(L, R);
  auto block = [&](int64_t k) { return std::min(L, (k + 1) * R) - k * R; };
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (passes * R * C));
  std::vector<acc_t> part(N * K * S);
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    run_task([&] {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / K, k = u % K;
        acc_t* s = part.data() + u * S;
        std::fill(s, s + S, acc_t(0));
        rows(n, k * R, k * R + block(k), s);
      }
    });
  });
  std::vector<acc_t> s(S);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(s.begin(), s.end(), acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      merge(s.data(), k * R, part.data() + (n * K + k) * S, block(k));
    }
    finish(n, s.data());
  }
  if (!with_apply) {
    return;
  }
  at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
    run_task([&] {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / K, k = u % K;
        apply(n, k * R, k * R + block(k));
      }
    });
  });
}

// ---- the backward's schedules: per-plane sums A, B, T (BwdSums), stored as (N, C) tensors --------

// NCHW: sums(p, off, len) -> BwdSums of a chunk; the plane's sums go to A, B, T[p]; then apply, which
// may read them.
template <typename acc_t, typename Sums, typename Apply>
void schedule_plane_sums(int64_t P, int64_t L, bool with_apply, acc_t* A, acc_t* B, acc_t* T, const Sums& sums,
                         const Apply& apply) {
  schedule_planes<BwdSums<acc_t>>(
      P, L, 2, with_apply, sums, [](BwdSums<acc_t>& s, const BwdSums<acc_t>& part) { s.add(part); },
      [&](int64_t p, const BwdSums<acc_t>& s) {
        A[p] = s.A;
        B[p] = s.B;
        T[p] = s.T;
      },
      apply);
}

// NHWC: rows(n, l0, l1, s) adds rows [l0, l1) of sample n to the per-channel sums A, B, T at s, s + C,
// s + 2 C; sample n's sums go to A, B, T[n * C, (n + 1) * C), then finish(n) (e.g. dx's per-channel
// coefficients), then apply.
template <typename acc_t, typename Rows, typename Finish, typename Apply>
void schedule_sample_sums(int64_t N, int64_t C, int64_t L, bool with_apply, acc_t* A, acc_t* B, acc_t* T,
                          const Rows& rows, const Finish& finish, const Apply& apply) {
  schedule_samples<acc_t>(
      N, C, L, 3, 2, with_apply, rows,
      [&](acc_t* into, int64_t, const acc_t* part, int64_t) {
        for (int64_t i = 0; i < 3 * C; ++i) {
          into[i] += part[i];
        }
      },
      [&](int64_t n, const acc_t* s) {
        std::copy(s, s + C, A + n * C);
        std::copy(s + C, s + 2 * C, B + n * C);
        std::copy(s + 2 * C, s + 3 * C, T + n * C);
        finish(n);
      },
      apply);
}

} // namespace cpu
} // namespace frn_det
