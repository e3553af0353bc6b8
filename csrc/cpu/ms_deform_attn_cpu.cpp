// CPU backend of sdetr::ms_deform_attn and its backward.
//
// Layout: value is [N, S, M, D], so the D channels of one head at one position are contiguous and
// consecutive positions of a head are M * D elements apart ("row"). For each (query, head) row the four
// bilinear corners and weights of its L * P points are computed by locate_row (8 points at a time with
// AVX2 intrinsics for fp32, because GCC does not vectorise the scalar loop's masked corner logic; the
// scalar locate_points for the tail and other types), one row ahead of the row being summed so that all
// four corners of its points can be prefetched without per-corner branches; the channel loops are
// contiguous so that the compiler vectorises them (`omp simd`, enabled by -fopenmp-simd). A profile of
// the hot loop before this (perf annotate, forward) put ~29 % of the time in the scalar corner code and
// ~31 % in prefetching and per-row integer divisions, so the kernels were instruction-bound.
//
// Order: the kernels are bound by scattered loads (and, in the backward, read-modify-writes of
// grad_value) rather than arithmetic, so both passes visit the queries of each batch element in Z order
// of their mean sampling location (query_order): consecutive queries then touch nearby positions of
// value and grad_value while those are still in cache. Each output element is computed exactly as
// before; only grad_value's summation order depends on the visiting order.
//
// Parallelism (at::parallel_for):
//   forward   over (n, sorted query) rows: each row writes only its own output.
//   backward  over (n, head group[, query chunk]) tasks: grad_value[n, :, heads of the group, :] is
//             written by one task only, so no atomics and no per-thread copies of grad_value are needed
//             while N * M >= threads. With one thread (or N >= threads) a task takes all heads, so each
//             visited position's whole row is used. With more threads than N * M the queries are split
//             into C chunks, and chunk c > 0 accumulates into its own zeroed buffer (C - 1 extra
//             grad_value-sized buffers), summed at the end.
//
// ISA: the kernels are instantiated twice on x86 with GCC/Clang, for the baseline ISA and with
// target("avx2,fma"), and the AVX2 copy is chosen at run time when the CPU has it (never -march=native,
// so a cached build runs on any x86-64 machine). SDETR_MSDA_CPU_ISA=default (or ATen's
// ATEN_CPU_CAPABILITY=default) forces the baseline copy.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SDETR_X86_MULTIVERSION 1
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define SDETR_ALWAYS_INLINE inline __attribute__((always_inline))
#define SDETR_PRAGMA(x) _Pragma(#x)
#else
#define SDETR_ALWAYS_INLINE inline
#define SDETR_PRAGMA(x)
#endif

namespace sdetr {
namespace {

template <typename T>
struct Args {
  const T* value;         // [N, S, M, D]
  const int64_t* shapes;  // [L, 2]
  const int64_t* starts;  // [L]
  const T* loc;           // [N, Lq, M, L, P, 2]
  const T* attn;          // [N, Lq, M, L, P]
  T* out;                 // forward: [N, Lq, M, D]
  const T* grad_out;      // backward: [N, Lq, M, D]
  T* grad_loc;            // backward: [N, Lq, M, L, P, 2]
  T* grad_attn;           // backward: [N, Lq, M, L, P]
  const int32_t* order;   // [N, Lq]: the queries of each batch element in processing (spatial) order
  int64_t N, S, M, D, Lq, L, P;
};

// The level geometry of point i = l * P + p of a row (same for every row), as flat arrays so that the
// per-row corner computation below is one vectorisable loop over the row's L * P points.
template <typename T>
struct Geometry {
  std::vector<T> Wf, Hf;
  std::vector<int32_t> Wi, Hi;
  std::vector<int64_t> start;  // first position of the point's level in S
  explicit Geometry(const Args<T>& a) {
    const int64_t LP = a.L * a.P;
    Wf.resize(LP), Hf.resize(LP), Wi.resize(LP), Hi.resize(LP), start.resize(LP);
    for (int64_t i = 0; i < LP; ++i) {
      const int64_t l = i / a.P;
      Hi[i] = static_cast<int32_t>(a.shapes[2 * l]);
      Wi[i] = static_cast<int32_t>(a.shapes[2 * l + 1]);
      Hf[i] = static_cast<T>(Hi[i]);
      Wf[i] = static_cast<T>(Wi[i]);
      start[i] = a.starts[l];
    }
  }
};

// The four bilinear corners of each of a row's L * P points, in the order (y0, x0), (y0, x1), (y1, x0),
// (y1, x1). grid_sample, align_corners=False: pixel x = loc_x * W - 0.5 (pixel centres at (i + 0.5) / W);
// zeros padding: a corner outside the map contributes nothing (bit k of mask clear).
template <typename T>
struct RowCorners {
  std::vector<T> fx, fy, w0, w1, w2, w3;
  std::vector<int32_t> cell;  // y0 * W + x0 within the level (negative when y0 or x0 is -1)
  std::vector<int32_t> mask;  // bit k: corner k inside the map; 0: the point contributes nothing
  explicit RowCorners(int64_t LP) {
    for (auto* v : {&fx, &fy, &w0, &w1, &w2, &w3}) {
      v->resize(LP);
    }
    cell.resize(LP);
    mask.resize(LP);
  }
};

template <typename T>
SDETR_ALWAYS_INLINE void locate_points(const T* __restrict__ loc, const Geometry<T>& g, int64_t begin,
                                       int64_t LP, RowCorners<T>& r) {
  const T* __restrict__ Wf = g.Wf.data();
  const T* __restrict__ Hf = g.Hf.data();
  const int32_t* __restrict__ Wi = g.Wi.data();
  const int32_t* __restrict__ Hi = g.Hi.data();
  T* __restrict__ fxs = r.fx.data();
  T* __restrict__ fys = r.fy.data();
  T* __restrict__ w0 = r.w0.data();
  T* __restrict__ w1 = r.w1.data();
  T* __restrict__ w2 = r.w2.data();
  T* __restrict__ w3 = r.w3.data();
  int32_t* __restrict__ cell = r.cell.data();
  int32_t* __restrict__ mask = r.mask.data();
  SDETR_PRAGMA(omp simd)
  for (int64_t i = begin; i < LP; ++i) {
    T x = loc[2 * i] * Wf[i] - T(0.5);
    T y = loc[2 * i + 1] * Hf[i] - T(0.5);
    // Also false for NaN coordinates.
    const bool inside = x > T(-1) && y > T(-1) && x < Wf[i] && y < Hf[i];
    x = inside ? x : T(0);  // keeps the conversions below defined
    y = inside ? y : T(0);
    const T xf = std::floor(x);
    const T yf = std::floor(y);
    const T fx = x - xf;
    const T fy = y - yf;
    const int32_t x0 = static_cast<int32_t>(xf);
    const int32_t y0 = static_cast<int32_t>(yf);
    const int32_t vx0 = x0 >= 0, vx1 = x0 + 1 < Wi[i], vy0 = y0 >= 0, vy1 = y0 + 1 < Hi[i];
    const int32_t corners = (vy0 & vx0) | ((vy0 & vx1) << 1) | ((vy1 & vx0) << 2) | ((vy1 & vx1) << 3);
    mask[i] = inside ? corners : 0;
    cell[i] = y0 * Wi[i] + x0;
    fxs[i] = fx;
    fys[i] = fy;
    w0[i] = (T(1) - fx) * (T(1) - fy);
    w1[i] = fx * (T(1) - fy);
    w2[i] = (T(1) - fx) * fy;
    w3[i] = fx * fy;
  }
}

#ifdef SDETR_X86_MULTIVERSION
// locate_points for fp32 in AVX2, 8 points at a time; the rest (LP % 8) by locate_points. GCC does not
// vectorise locate_points' loop (its mixed-width masks), and the scalar loop was about 30 % of the
// forward's instructions at the 300-query shape. Same arithmetic, so the same results bit for bit.
// (Not always-inline: it is called from the always-inline kernels, whose own target is the baseline.)
__attribute__((target("avx2,fma"))) void locate_row_avx2(const float* __restrict__ loc, const Geometry<float>& g,
                                                         int64_t LP, RowCorners<float>& r) {
  const __m256 minus_one = _mm256_set1_ps(-1.0f), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256i ones = _mm256_set1_epi32(1), minus_one_i = _mm256_set1_epi32(-1);
  int64_t i = 0;
  for (; i + 8 <= LP; i += 8) {
    // loc holds x0 y0 x1 y1 ...: de-interleave 16 floats into 8 x and 8 y in point order.
    const __m256 a = _mm256_loadu_ps(loc + 2 * i), b = _mm256_loadu_ps(loc + 2 * i + 8);
    const __m256 xs = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    const __m256 ys = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
    const __m256 Wf = _mm256_loadu_ps(g.Wf.data() + i), Hf = _mm256_loadu_ps(g.Hf.data() + i);
    const __m256i Wi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.Wi.data() + i));
    const __m256i Hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.Hi.data() + i));
    __m256 x = _mm256_sub_ps(_mm256_mul_ps(xs, Wf), half);
    __m256 y = _mm256_sub_ps(_mm256_mul_ps(ys, Hf), half);
    // Ordered comparisons: false for NaN, as in locate_points.
    const __m256 inside = _mm256_and_ps(
        _mm256_and_ps(_mm256_cmp_ps(x, minus_one, _CMP_GT_OQ), _mm256_cmp_ps(y, minus_one, _CMP_GT_OQ)),
        _mm256_and_ps(_mm256_cmp_ps(x, Wf, _CMP_LT_OQ), _mm256_cmp_ps(y, Hf, _CMP_LT_OQ)));
    x = _mm256_and_ps(x, inside);  // 0 outside
    y = _mm256_and_ps(y, inside);
    const __m256 xf = _mm256_floor_ps(x), yf = _mm256_floor_ps(y);
    const __m256 fx = _mm256_sub_ps(x, xf), fy = _mm256_sub_ps(y, yf);
    const __m256i x0 = _mm256_cvttps_epi32(xf), y0 = _mm256_cvttps_epi32(yf);
    const __m256i vx0 = _mm256_cmpgt_epi32(x0, minus_one_i);
    const __m256i vy0 = _mm256_cmpgt_epi32(y0, minus_one_i);
    const __m256i vx1 = _mm256_cmpgt_epi32(Wi, _mm256_add_epi32(x0, ones));
    const __m256i vy1 = _mm256_cmpgt_epi32(Hi, _mm256_add_epi32(y0, ones));
    __m256i corners = _mm256_and_si256(_mm256_and_si256(vy0, vx0), ones);
    corners = _mm256_or_si256(corners, _mm256_and_si256(_mm256_and_si256(vy0, vx1), _mm256_set1_epi32(2)));
    corners = _mm256_or_si256(corners, _mm256_and_si256(_mm256_and_si256(vy1, vx0), _mm256_set1_epi32(4)));
    corners = _mm256_or_si256(corners, _mm256_and_si256(_mm256_and_si256(vy1, vx1), _mm256_set1_epi32(8)));
    corners = _mm256_and_si256(corners, _mm256_castps_si256(inside));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.mask.data() + i), corners);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.cell.data() + i),
                        _mm256_add_epi32(_mm256_mullo_epi32(y0, Wi), x0));
    const __m256 gx = _mm256_sub_ps(one, fx), gy = _mm256_sub_ps(one, fy);
    _mm256_storeu_ps(r.fx.data() + i, fx);
    _mm256_storeu_ps(r.fy.data() + i, fy);
    _mm256_storeu_ps(r.w0.data() + i, _mm256_mul_ps(gx, gy));
    _mm256_storeu_ps(r.w1.data() + i, _mm256_mul_ps(fx, gy));
    _mm256_storeu_ps(r.w2.data() + i, _mm256_mul_ps(gx, fy));
    _mm256_storeu_ps(r.w3.data() + i, _mm256_mul_ps(fx, fy));
  }
  locate_points(loc, g, i, LP, r);
}
#endif

// The corners and weights of a row's L * P points (loc: the row's [L * P, 2] sampling locations).
template <bool kAvx2, typename T>
SDETR_ALWAYS_INLINE void locate_row(const T* __restrict__ loc, const Geometry<T>& g, int64_t LP, RowCorners<T>& r) {
#ifdef SDETR_X86_MULTIVERSION
  if constexpr (kAvx2 && std::is_same_v<T, float>) {
    locate_row_avx2(loc, g, LP, r);
    return;
  }
#endif
  locate_points(loc, g, 0, LP, r);
}

// Prefetches the corners of a located row in `base` (value, or grad_value for writing): issued one row
// ahead of the row being summed, so that the scattered corner loads of the next row are in flight while
// this one computes (without it each point waits for its own loads).
template <int kWrite, int kLines, typename T>
SDETR_ALWAYS_INLINE void prefetch_row(const RowCorners<T>& r, const Geometry<T>& g, int64_t LP, int64_t row,
                                      int64_t D, const T* base) {
#if defined(__GNUC__)
  // All four corners of every contributing point, without testing each corner: a prefetch never faults,
  // and the branches cost more than the few useless prefetches at the maps' edges. Integer addresses, as
  // a corner outside the map may lie outside the tensor.
  const int64_t lines = kLines > 0 ? kLines : (D * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  const int64_t stride = row * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < LP; ++i) {
    if (r.mask[i] == 0) {
      continue;
    }
    const uintptr_t c0 = b + static_cast<uintptr_t>((g.start[i] + r.cell[i]) * stride);
    const uintptr_t c2 = c0 + static_cast<uintptr_t>(g.Wi[i] * stride);
    for (int64_t j = 0; j < lines; ++j) {
      __builtin_prefetch(reinterpret_cast<const void*>(c0 + 64 * j), kWrite, 3);
      __builtin_prefetch(reinterpret_cast<const void*>(c0 + stride + 64 * j), kWrite, 3);
      __builtin_prefetch(reinterpret_cast<const void*>(c2 + 64 * j), kWrite, 3);
      __builtin_prefetch(reinterpret_cast<const void*>(c2 + stride + 64 * j), kWrite, 3);
    }
  }
#endif
}

// Forward over positions k in [begin, end) of the flattened (n, sorted query): row nq = n * Lq + order[k].
// kD > 0 fixes D at compile time, so that the accumulator stays in registers.
template <typename T, int kD, bool kAvx2>
SDETR_ALWAYS_INLINE void forward_rows(const Args<T>& a, int64_t begin, int64_t end) {
  constexpr int kLines = kD > 0 ? static_cast<int>((kD * sizeof(T) + 63) / 64) : 0;
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t M = a.M, LP = a.L * a.P, row = M * D;
  const Geometry<T> geo(a);
  RowCorners<T> cur(LP), next(LP);
  T acc_fixed[kD > 0 ? kD : 1];
  if (begin < end) {
    const int64_t nq = begin / a.Lq * a.Lq + a.order[begin];
    locate_row<kAvx2>(a.loc + nq * M * LP * 2, geo, LP, cur);
  }
  for (int64_t k = begin; k < end; ++k) {
    const int64_t n = k / a.Lq;
    const int64_t nq = n * a.Lq + a.order[k];
    const int64_t next_n = (k + 1) / a.Lq;
    const int64_t next_nq = k + 1 < end ? next_n * a.Lq + a.order[k + 1] : -1;
    for (int64_t m = 0; m < M; ++m) {
      // Locate the next row of this chunk, (nq, m + 1) or (next query, 0), and prefetch its corners.
      const int64_t next_row = m + 1 < M ? nq * M + m + 1 : (next_nq >= 0 ? next_nq * M : -1);
      if (next_row >= 0) {
        const int64_t nn = m + 1 < M ? n : next_n, nm = m + 1 < M ? m + 1 : 0;
        locate_row<kAvx2>(a.loc + next_row * LP * 2, geo, LP, next);
        prefetch_row<0, kLines>(next, geo, LP, row, D, a.value + nn * a.S * row + nm * D);
      }
      T* o = a.out + (nq * M + m) * D;
      T* acc = kD > 0 ? acc_fixed : o;
      SDETR_PRAGMA(omp simd)
      for (int64_t d = 0; d < D; ++d) {
        acc[d] = T(0);
      }
      const T* head = a.value + n * a.S * row + m * D;
      const T* attn = a.attn + (nq * M + m) * LP;
      for (int64_t i = 0; i < LP; ++i) {
        const int32_t mk = cur.mask[i];
        if (mk == 0) {
          continue;
        }
        const T aw = attn[i];
        const int64_t W = geo.Wi[i];
        const int64_t off = (geo.start[i] + cur.cell[i]) * row;
        const T c[4] = {aw * cur.w0[i], aw * cur.w1[i], aw * cur.w2[i], aw * cur.w3[i]};
        const int64_t offs[4] = {off, off + row, off + W * row, off + (W + 1) * row};
        if (mk == 15) {
          const T* __restrict__ v0 = head + offs[0];
          const T* __restrict__ v1 = head + offs[1];
          const T* __restrict__ v2 = head + offs[2];
          const T* __restrict__ v3 = head + offs[3];
          const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
          SDETR_PRAGMA(omp simd)
          for (int64_t d = 0; d < D; ++d) {
            acc[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];
          }
        } else {
          for (int j = 0; j < 4; ++j) {
            if (!(mk & (1 << j))) {
              continue;
            }
            const T* __restrict__ v = head + offs[j];
            const T cj = c[j];
            SDETR_PRAGMA(omp simd)
            for (int64_t d = 0; d < D; ++d) {
              acc[d] += cj * v[d];
            }
          }
        }
      }
      if (kD > 0) {
        SDETR_PRAGMA(omp simd)
        for (int64_t d = 0; d < D; ++d) {
          o[d] = acc[d];
        }
      }
      std::swap(cur, next);
    }
  }
}

// Backward for the sorted queries k in [k_begin, k_end) of batch n, heads [m0, m1); grad_value contributions
// go to gv ([N, S, M, D]; its heads [m0, m1) of batch n are written by this task only, and are zeroed by it
// first when zero_first, else zero-initialised by the caller).
template <typename T, int kD, bool kAvx2>
SDETR_ALWAYS_INLINE void backward_task(const Args<T>& a, int64_t n, int64_t m0, int64_t m1, int64_t k_begin,
                                       int64_t k_end, T* gv, bool zero_first) {
  constexpr int kLines = kD > 0 ? static_cast<int>((kD * sizeof(T) + 63) / 64) : 0;
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t M = a.M, LP = a.L * a.P, row = M * D;
  const T* batch = a.value + n * a.S * row;
  T* gbatch = gv + n * a.S * row;
  if (zero_first) {
    // This task's slice of grad_value, cleared here rather than in a separate pass over all of it.
    if (m0 == 0 && m1 == M) {
      std::memset(gbatch, 0, static_cast<size_t>(a.S * row) * sizeof(T));
    } else {
      for (int64_t pos = 0; pos < a.S; ++pos) {
        std::memset(gbatch + pos * row + m0 * D, 0, static_cast<size_t>((m1 - m0) * D) * sizeof(T));
      }
    }
  }
  const Geometry<T> geo(a);
  RowCorners<T> cur(LP), next(LP);
  std::vector<T> gbuf(4 * LP);  // <grad_out, value at corner k> of each point
  T* __restrict__ gk[4] = {gbuf.data(), gbuf.data() + LP, gbuf.data() + 2 * LP, gbuf.data() + 3 * LP};
  if (k_begin < k_end && m0 < m1) {
    const int64_t nq = n * a.Lq + a.order[n * a.Lq + k_begin];
    locate_row<kAvx2>(a.loc + (nq * M + m0) * LP * 2, geo, LP, cur);
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t nq = n * a.Lq + a.order[n * a.Lq + k];
    const int64_t next_nq = k + 1 < k_end ? n * a.Lq + a.order[n * a.Lq + k + 1] : -1;
    for (int64_t m = m0; m < m1; ++m) {
      // Locate the next (query, head) of this task, (nq, m + 1) or (next query, m0), and prefetch its corners.
      const int64_t next_row = m + 1 < m1 ? nq * M + m + 1 : (next_nq >= 0 ? next_nq * M + m0 : -1);
      if (next_row >= 0) {
        locate_row<kAvx2>(a.loc + next_row * LP * 2, geo, LP, next);
        const int64_t nm = m + 1 < m1 ? m + 1 : m0;
        prefetch_row<0, kLines>(next, geo, LP, row, D, batch + nm * D);
        prefetch_row<1, kLines>(next, geo, LP, row, D, static_cast<const T*>(gbatch + nm * D));
      }
      const T* head = batch + m * D;
      T* ghead = gbatch + m * D;
      const int64_t r = nq * M + m;
      const T* __restrict__ go = a.grad_out + r * D;
      const T* __restrict__ attn = a.attn + r * LP;
      for (int64_t i = 0; i < LP; ++i) {
        const int32_t mk = cur.mask[i];
        T g0 = T(0), g1 = T(0), g2 = T(0), g3 = T(0);
        if (mk != 0) {
          const T aw = attn[i];
          const int64_t W = geo.Wi[i];
          const int64_t off = (geo.start[i] + cur.cell[i]) * row;
          const int64_t offs[4] = {off, off + row, off + W * row, off + (W + 1) * row};
          const T c[4] = {aw * cur.w0[i], aw * cur.w1[i], aw * cur.w2[i], aw * cur.w3[i]};
          if (mk == 15) {
            const T* __restrict__ v0 = head + offs[0];
            const T* __restrict__ v1 = head + offs[1];
            const T* __restrict__ v2 = head + offs[2];
            const T* __restrict__ v3 = head + offs[3];
            T* __restrict__ gv0 = ghead + offs[0];
            T* __restrict__ gv1 = ghead + offs[1];
            T* __restrict__ gv2 = ghead + offs[2];
            T* __restrict__ gv3 = ghead + offs[3];
            const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
            SDETR_PRAGMA(omp simd reduction(+ : g0, g1, g2, g3))
            for (int64_t d = 0; d < D; ++d) {
              const T gd = go[d];
              g0 += gd * v0[d];
              g1 += gd * v1[d];
              g2 += gd * v2[d];
              g3 += gd * v3[d];
              gv0[d] += c0 * gd;
              gv1[d] += c1 * gd;
              gv2[d] += c2 * gd;
              gv3[d] += c3 * gd;
            }
          } else {
            T g[4] = {T(0), T(0), T(0), T(0)};
            for (int j = 0; j < 4; ++j) {
              if (!(mk & (1 << j))) {
                continue;
              }
              const T* __restrict__ v = head + offs[j];
              T* __restrict__ gvj = ghead + offs[j];
              const T cj = c[j];
              T gj = T(0);
              SDETR_PRAGMA(omp simd reduction(+ : gj))
              for (int64_t d = 0; d < D; ++d) {
                const T gd = go[d];
                gj += gd * v[d];
                gvj[d] += cj * gd;
              }
              g[j] = gj;
            }
            g0 = g[0];
            g1 = g[1];
            g2 = g[2];
            g3 = g[3];
          }
        }
        gk[0][i] = g0;
        gk[1][i] = g1;
        gk[2][i] = g2;
        gk[3][i] = g3;
      }
      // Gradients of the attention weights and sampling locations of the row's points, in one vectorised
      // pass; exact zeros for points that contribute nothing.
      T* __restrict__ gattn = a.grad_attn + r * LP;
      T* __restrict__ gloc = a.grad_loc + r * LP * 2;
      const T* __restrict__ fxs = cur.fx.data();
      const T* __restrict__ fys = cur.fy.data();
      const T* __restrict__ w0 = cur.w0.data();
      const T* __restrict__ w1 = cur.w1.data();
      const T* __restrict__ w2 = cur.w2.data();
      const T* __restrict__ w3 = cur.w3.data();
      const int32_t* __restrict__ mask = cur.mask.data();
      const T* __restrict__ Wf = geo.Wf.data();
      const T* __restrict__ Hf = geo.Hf.data();
      SDETR_PRAGMA(omp simd)
      for (int64_t i = 0; i < LP; ++i) {
        const T aw = attn[i];
        const T fx = fxs[i], fy = fys[i];
        const T g0 = gk[0][i], g1 = gk[1][i], g2 = gk[2][i], g3 = gk[3][i];
        const bool on = mask[i] != 0;
        gattn[i] = on ? w0[i] * g0 + w1[i] * g1 + w2[i] * g2 + w3[i] * g3 : T(0);
        // d x / d loc_x = W, d y / d loc_y = H.
        gloc[2 * i] = on ? aw * Wf[i] * ((T(1) - fy) * (g1 - g0) + fy * (g3 - g2)) : T(0);
        gloc[2 * i + 1] = on ? aw * Hf[i] * ((T(1) - fx) * (g2 - g0) + fx * (g3 - g1)) : T(0);
      }
      std::swap(cur, next);
    }
  }
}

// Entry points per ISA. The always-inline kernels above are compiled into each of them.
template <typename T, int kD>
void forward_rows_base(const Args<T>& a, int64_t b, int64_t e) {
  forward_rows<T, kD, false>(a, b, e);
}
template <typename T, int kD>
void backward_task_base(const Args<T>& a, int64_t n, int64_t m0, int64_t m1, int64_t kb, int64_t ke, T* gv,
                        bool zero_first) {
  backward_task<T, kD, false>(a, n, m0, m1, kb, ke, gv, zero_first);
}
#ifdef SDETR_X86_MULTIVERSION
template <typename T, int kD>
__attribute__((target("avx2,fma"))) void forward_rows_avx2(const Args<T>& a, int64_t b, int64_t e) {
  forward_rows<T, kD, true>(a, b, e);
}
template <typename T, int kD>
__attribute__((target("avx2,fma"))) void backward_task_avx2(const Args<T>& a, int64_t n, int64_t m0, int64_t m1,
                                                              int64_t kb, int64_t ke, T* gv, bool zero_first) {
  backward_task<T, kD, true>(a, n, m0, m1, kb, ke, gv, zero_first);
}
#endif

bool use_avx2() {
#ifdef SDETR_X86_MULTIVERSION
  static const bool cpu_has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (!cpu_has) {
    return false;
  }
  for (const char* var : {"SDETR_MSDA_CPU_ISA", "ATEN_CPU_CAPABILITY"}) {
    const char* isa = std::getenv(var);
    if (isa != nullptr && std::strcmp(isa, "default") == 0) {
      return false;
    }
  }
  return true;
#else
  return false;
#endif
}

template <typename T>
using ForwardFn = void (*)(const Args<T>&, int64_t, int64_t);
template <typename T>
using BackwardFn = void (*)(const Args<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, T*, bool);

template <typename T, int kD>
ForwardFn<T> pick_forward() {
#ifdef SDETR_X86_MULTIVERSION
  if (use_avx2()) {
    return &forward_rows_avx2<T, kD>;
  }
#endif
  return &forward_rows_base<T, kD>;
}

template <typename T, int kD>
BackwardFn<T> pick_backward() {
#ifdef SDETR_X86_MULTIVERSION
  if (use_avx2()) {
    return &backward_task_avx2<T, kD>;
  }
#endif
  return &backward_task_base<T, kD>;
}

// The queries of each batch element in Z (Morton) order of the mean of their sampling locations on a
// 64 x 64 grid of the image, so that consecutive queries read (and, in the backward, write) nearby
// positions of value while they are still in cache. The result does not depend on the order except
// for the summation order of grad_value. Non-finite means go to the grid's first cell.
template <typename T>
at::Tensor query_order(const T* loc, int64_t N, int64_t Lq, int64_t points) {
  constexpr int kBits = 6;
  constexpr int64_t kCells = int64_t(1) << (2 * kBits);
  auto order = at::empty({N, Lq}, at::TensorOptions().dtype(at::kInt));
  int32_t* out = order.data_ptr<int32_t>();
  std::vector<uint16_t> keys(static_cast<size_t>(N * Lq));
  const T inv = T(1) / static_cast<T>(std::max<int64_t>(1, points));
  // Serial: cheap (one pass over the locations), and one parallel region less to wait for.
  for (int64_t r = 0; r < N * Lq; ++r) {
    const T* xy = loc + r * points * 2;
    T sx = T(0), sy = T(0);
    SDETR_PRAGMA(omp simd reduction(+ : sx, sy))
    for (int64_t i = 0; i < points; ++i) {
      sx += xy[2 * i];
      sy += xy[2 * i + 1];
    }
    uint32_t cell[2] = {0, 0};
    const T mean[2] = {sx * inv, sy * inv};
    for (int j = 0; j < 2; ++j) {
      const T c = mean[j] * static_cast<T>(1 << kBits);
      // !(c > 0) also catches NaN.
      const bool top = c >= static_cast<T>((1 << kBits) - 1);
      cell[j] = !(c > T(0)) ? 0u : (top ? (1u << kBits) - 1 : static_cast<uint32_t>(c));
    }
    uint32_t key = 0;
    for (int bit = 0; bit < kBits; ++bit) {
      key |= ((cell[0] >> bit) & 1u) << (2 * bit);
      key |= ((cell[1] >> bit) & 1u) << (2 * bit + 1);
    }
    keys[r] = static_cast<uint16_t>(key);
  }
  std::vector<int32_t> start(kCells + 1);
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* kn = keys.data() + n * Lq;
    std::fill(start.begin(), start.end(), 0);
    for (int64_t q = 0; q < Lq; ++q) {
      ++start[kn[q] + 1];
    }
    for (int64_t c = 0; c < kCells; ++c) {
      start[c + 1] += start[c];
    }
    int32_t* on = out + n * Lq;
    for (int64_t q = 0; q < Lq; ++q) {
      on[start[kn[q]]++] = static_cast<int32_t>(q);
    }
  }
  return order;
}

// Arithmetic type: float for fp16/bf16/fp32 values, double for fp64.
at::ScalarType compute_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// spatial_shapes / level_start_index as contiguous int64 on the CPU, checked against S so that no
// level can index outside value.
std::pair<at::Tensor, at::Tensor> level_tables(const at::Tensor& spatial_shapes,
                                               const at::Tensor& level_start_index, int64_t S) {
  auto shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  auto starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(sh[2 * l] >= 0 && sh[2 * l + 1] >= 0 && st[l] >= 0 && st[l] + sh[2 * l] * sh[2 * l + 1] <= S,
                "ms_deform_attn: level ", l, " (H=", sh[2 * l], ", W=", sh[2 * l + 1], ", start=", st[l],
                ") does not fit in value's S=", S);
    // The kernels index a level's positions with int32 (y * W + x).
    TORCH_CHECK(sh[2 * l] * sh[2 * l + 1] + sh[2 * l + 1] + 1 < std::numeric_limits<int32_t>::max(),
                "ms_deform_attn (CPU kernel): level ", l, " (H=", sh[2 * l], ", W=", sh[2 * l + 1],
                ") has more than 2^31 positions");
  }
  return {shapes, starts};
}

// A zero-filled contiguous tensor of t's sizes and dtype, cleared with memset in parallel chunks: libc's
// memset clears large blocks with string stores that do not read the lines first, where ATen's fill_ loads
// each line before writing it.
at::Tensor zeros_like_contiguous(const at::Tensor& t) {
  auto z = at::empty(t.sizes(), t.options());
  char* base = static_cast<char*>(z.data_ptr());
  const int64_t bytes = z.numel() * static_cast<int64_t>(z.element_size());
  constexpr int64_t kChunk = int64_t(1) << 20;
  at::parallel_for(0, (bytes + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
    const int64_t lo = b * kChunk, hi = std::min(bytes, e * kChunk);
    std::memset(base + lo, 0, static_cast<size_t>(hi - lo));
  });
  return z;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ms_deform_attn (CPU kernel): ", name, " must be on the CPU, got ", t.device());
}

}  // namespace

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const MsdaSizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value, "value");
  check_cpu(sampling_locations, "sampling_locations");
  check_cpu(attention_weights, "attention_weights");
  const auto ct = compute_type(value);
  const auto v = value.to(ct).contiguous();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const auto tables = level_tables(spatial_shapes, level_start_index, s.S);
  auto out = at::empty({s.N, s.Lq, s.M * s.D}, v.options());
  if (out.numel() == 0) {
    return out.to(value.scalar_type());
  }
  if (s.L * s.P == 0) {
    return out.zero_().to(value.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "ms_deform_attn_cpu", [&] {
    Args<scalar_t> a{};
    a.value = v.data_ptr<scalar_t>();
    a.shapes = tables.first.data_ptr<int64_t>();
    a.starts = tables.second.data_ptr<int64_t>();
    a.loc = loc.data_ptr<scalar_t>();
    a.attn = attn.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    const at::Tensor order = query_order(a.loc, s.N, s.Lq, s.M * s.L * s.P);
    a.order = order.data_ptr<int32_t>();
    a.N = s.N;
    a.S = s.S;
    a.M = s.M;
    a.D = s.D;
    a.Lq = s.Lq;
    a.L = s.L;
    a.P = s.P;
    const ForwardFn<scalar_t> fn = s.D == 32 ? pick_forward<scalar_t, 32>() : pick_forward<scalar_t, 0>();
    // About 4 * D * L * P multiply-adds per head and row: aim at >= ~64k per chunk.
    const int64_t work_per_row = std::max<int64_t>(1, s.M * s.L * s.P * s.D);
    const int64_t grain = std::max<int64_t>(1, 65536 / work_per_row);
    at::parallel_for(0, s.N * s.Lq, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return out.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.numel() == s.N * s.Lq * s.M * s.D,
              "ms_deform_attn_backward: grad_output must have N * Lq * M * D elements, got shape ",
              grad_output.sizes());
  check_cpu(grad_output, "grad_output");
  check_cpu(value, "value");
  check_cpu(sampling_locations, "sampling_locations");
  check_cpu(attention_weights, "attention_weights");
  const auto ct = compute_type(value);
  const auto v = value.to(ct).contiguous();
  const auto go = grad_output.to(ct).contiguous();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const auto tables = level_tables(spatial_shapes, level_start_index, s.S);
  // Cleared by the backward tasks themselves (each its own slice) when the queries are not split into
  // chunks; zeroed here otherwise, and where the tasks do not run.
  auto grad_value = at::empty(v.sizes(), v.options());
  bool tasks_clear = false;
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_attn.numel() > 0 && s.D == 0) {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
  } else if (grad_attn.numel() > 0) {
    // Tasks (n, head group, chunk); see the note at the top of the file.
    const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
    const int64_t groups = s.N >= threads ? 1 : std::min<int64_t>(s.M, (threads + s.N - 1) / s.N);
    const int64_t heads = s.N * groups;
    int64_t chunks = 1;
    if (heads < threads) {
      chunks = std::min<int64_t>((threads + heads - 1) / heads, std::max<int64_t>(1, s.Lq / 64));
    }
    tasks_clear = chunks == 1;
    if (!tasks_clear) {
      grad_value = zeros_like_contiguous(v);
    }
    std::vector<at::Tensor> extra;
    for (int64_t c = 1; c < chunks; ++c) {
      extra.push_back(zeros_like_contiguous(v));
    }
    AT_DISPATCH_FLOATING_TYPES(ct, "ms_deform_attn_backward_cpu", [&] {
      Args<scalar_t> a{};
      a.value = v.data_ptr<scalar_t>();
      a.shapes = tables.first.data_ptr<int64_t>();
      a.starts = tables.second.data_ptr<int64_t>();
      a.loc = loc.data_ptr<scalar_t>();
      a.attn = attn.data_ptr<scalar_t>();
      a.grad_out = go.data_ptr<scalar_t>();
      a.grad_loc = grad_loc.data_ptr<scalar_t>();
      a.grad_attn = grad_attn.data_ptr<scalar_t>();
      const at::Tensor order = query_order(a.loc, s.N, s.Lq, s.M * s.L * s.P);
      a.order = order.data_ptr<int32_t>();
      a.N = s.N;
      a.S = s.S;
      a.M = s.M;
      a.D = s.D;
      a.Lq = s.Lq;
      a.L = s.L;
      a.P = s.P;
      std::vector<scalar_t*> buffers{grad_value.data_ptr<scalar_t>()};
      for (auto& t : extra) {
        buffers.push_back(t.data_ptr<scalar_t>());
      }
      const BackwardFn<scalar_t> fn = s.D == 32 ? pick_backward<scalar_t, 32>() : pick_backward<scalar_t, 0>();
      at::parallel_for(0, heads * chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t c = t % chunks;
          const int64_t g = (t / chunks) % groups;
          const int64_t n = t / (chunks * groups);
          const int64_t m0 = s.M * g / groups, m1 = s.M * (g + 1) / groups;
          const int64_t k_begin = s.Lq * c / chunks, k_end = s.Lq * (c + 1) / chunks;
          fn(a, n, m0, m1, k_begin, k_end, buffers[c], tasks_clear);
        }
      });
    });
    for (auto& t : extra) {
      grad_value.add_(t);
    }
  } else {
    grad_value.zero_();
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace sdetr
