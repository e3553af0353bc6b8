// CPU backend of sdetr::ms_deform_attn and its backward.
//
// Layout: value is [N, S, M, D], so the D channels of one head at one position are contiguous and
// consecutive positions of a head are M * D elements apart ("row"). For every sampling point the four
// bilinear corners and their weights are computed once and reused over the D channels, and the channel
// loops are contiguous so that the compiler vectorises them (`omp simd`, enabled by -fopenmp-simd).
//
// Parallelism (at::parallel_for):
//   forward   over (n, q) rows: each row writes only its own output.
//   backward  over (n, m[, query chunk]) tasks: grad_value[n, :, m, :] is written by one task only, so no
//             atomics and no per-thread copies of grad_value are needed while N * M >= threads. With
//             more threads than N * M the queries of each head are split into C chunks, and chunk c > 0
//             accumulates into its own zeroed buffer (C - 1 extra grad_value-sized buffers), summed at
//             the end.
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
#include <vector>

#include "../ms_deform_attn.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SDETR_X86_MULTIVERSION 1
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

// One sampling point resolved to its four corners, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename T>
struct Corners {
  int64_t offset[4];  // element offset of each corner's channels from the level's first position
  T w[4];             // bilinear weights
  bool valid[4];      // corner inside the map (zeros padding: outside corners contribute nothing)
  bool any;           // some corner is inside the map
  bool all;           // all four are
  T fx, fy;           // fractional position inside the cell
};

// grid_sample, align_corners=False: pixel x = loc_x * W - 0.5 (pixel centres at (i + 0.5) / W).
template <typename T>
SDETR_ALWAYS_INLINE void locate(T lx, T ly, int64_t H, int64_t W, int64_t row, Corners<T>& c) {
  const T x = lx * static_cast<T>(W) - T(0.5);
  const T y = ly * static_cast<T>(H) - T(0.5);
  // Also false for NaN coordinates.
  c.any = x > T(-1) && y > T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H);
  if (!c.any) {
    return;
  }
  const T xf = std::floor(x);
  const T yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf);
  const int64_t y0 = static_cast<int64_t>(yf);
  const T fx = x - xf;
  const T fy = y - yf;
  c.fx = fx;
  c.fy = fy;
  const bool vx0 = x0 >= 0, vx1 = x0 + 1 < W, vy0 = y0 >= 0, vy1 = y0 + 1 < H;
  c.valid[0] = vy0 && vx0;
  c.valid[1] = vy0 && vx1;
  c.valid[2] = vy1 && vx0;
  c.valid[3] = vy1 && vx1;
  c.all = c.valid[0] && c.valid[1] && c.valid[2] && c.valid[3];
  c.w[0] = (T(1) - fx) * (T(1) - fy);
  c.w[1] = fx * (T(1) - fy);
  c.w[2] = (T(1) - fx) * fy;
  c.w[3] = fx * fy;
  const int64_t base = (y0 * W + x0) * row;
  c.offset[0] = base;
  c.offset[1] = base + row;
  c.offset[2] = base + W * row;
  c.offset[3] = base + (W + 1) * row;
}

// Prefetches the corners of row `g`'s L * P points in `base` (value, or grad_value for writing): issued one
// row ahead of the row being summed, so that the scattered corner loads of the next row are in flight
// while this one computes (without it each point waits for its own loads).
template <int kWrite, typename T>
SDETR_ALWAYS_INLINE void prefetch_row(const T* loc, const int64_t* shapes, const int64_t* starts, int64_t L,
                                      int64_t P, int64_t row, int64_t D, const T* base) {
#if defined(__GNUC__)
  const int64_t lines = (D * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const T* level = base + starts[l] * row;
    for (int64_t p = 0; p < P; ++p, loc += 2) {
      const T x = loc[0] * static_cast<T>(W) - T(0.5);
      const T y = loc[1] * static_cast<T>(H) - T(0.5);
      if (!(x > T(-1) && y > T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H))) {
        continue;
      }
      // Clamped into the map: a corner outside is not read, its in-map neighbour is.
      const int64_t x0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(x)));
      const int64_t y0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(y)));
      const int64_t x1 = std::min<int64_t>(W - 1, x0 + 1), y1 = std::min<int64_t>(H - 1, y0 + 1);
      const int64_t cells[4] = {y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1};
      for (int k = 0; k < 4; ++k) {
        const char* c = reinterpret_cast<const char*>(level + cells[k] * row);
        for (int64_t j = 0; j < lines; ++j) {
          __builtin_prefetch(c + 64 * j, kWrite, 3);
        }
      }
    }
  }
#endif
}

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
  int64_t N, S, M, D, Lq, L, P;
};

// Forward over rows nq in [begin, end) of the flattened (n, q). kD > 0 fixes D at compile time, so that
// the accumulator stays in registers.
template <typename T, int kD>
SDETR_ALWAYS_INLINE void forward_rows(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t M = a.M, L = a.L, P = a.P, row = M * D;
  T acc_fixed[kD > 0 ? kD : 1];
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / a.Lq;
    for (int64_t m = 0; m < M; ++m) {
      // The next row (n', q', m') of this chunk: (nq, m + 1), or (nq + 1, 0).
      const int64_t next = nq * M + m + 1;
      if (next < end * M) {
        const int64_t nn = next / M / a.Lq, nm = next % M;
        prefetch_row<0>(a.loc + next * L * P * 2, a.shapes, a.starts, L, P, row, D,
                        a.value + nn * a.S * row + nm * D);
      }
      T* o = a.out + (nq * M + m) * D;
      T* acc = kD > 0 ? acc_fixed : o;
      SDETR_PRAGMA(omp simd)
      for (int64_t d = 0; d < D; ++d) {
        acc[d] = T(0);
      }
      const T* head = a.value + n * a.S * row + m * D;
      const int64_t pt0 = (nq * M + m) * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const T* level = head + a.starts[l] * row;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = pt0 + l * P + p;
          Corners<T> c;
          locate(a.loc[2 * i], a.loc[2 * i + 1], H, W, row, c);
          if (!c.any) {
            continue;
          }
          const T aw = a.attn[i];
          if (c.all) {
            const T* __restrict__ v0 = level + c.offset[0];
            const T* __restrict__ v1 = level + c.offset[1];
            const T* __restrict__ v2 = level + c.offset[2];
            const T* __restrict__ v3 = level + c.offset[3];
            const T c0 = aw * c.w[0], c1 = aw * c.w[1], c2 = aw * c.w[2], c3 = aw * c.w[3];
            SDETR_PRAGMA(omp simd)
            for (int64_t d = 0; d < D; ++d) {
              acc[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];
            }
          } else {
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) {
                continue;
              }
              const T* __restrict__ v = level + c.offset[k];
              const T ck = aw * c.w[k];
              SDETR_PRAGMA(omp simd)
              for (int64_t d = 0; d < D; ++d) {
                acc[d] += ck * v[d];
              }
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
    }
  }
}

// Backward for queries [q_begin, q_end) of head m in batch n; grad_value contributions go to gv
// ([N, S, M, D], zero-initialised, written by this task only).
template <typename T, int kD>
SDETR_ALWAYS_INLINE void backward_task(const Args<T>& a, int64_t n, int64_t m, int64_t q_begin, int64_t q_end,
                                       T* gv) {
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t M = a.M, L = a.L, P = a.P, row = M * D;
  const T* head = a.value + n * a.S * row + m * D;
  T* ghead = gv + n * a.S * row + m * D;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t nq = n * a.Lq + q;
    if (q + 1 < q_end) {
      const T* next_loc = a.loc + ((nq + 1) * M + m) * L * P * 2;
      prefetch_row<0>(next_loc, a.shapes, a.starts, L, P, row, D, head);
      prefetch_row<1>(next_loc, a.shapes, a.starts, L, P, row, D, static_cast<const T*>(ghead));
    }
    const T* __restrict__ go = a.grad_out + (nq * M + m) * D;
    const int64_t pt0 = (nq * M + m) * L * P;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
      const T* level = head + a.starts[l] * row;
      T* glevel = ghead + a.starts[l] * row;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = pt0 + l * P + p;
        Corners<T> c;
        locate(a.loc[2 * i], a.loc[2 * i + 1], H, W, row, c);
        if (!c.any) {
          a.grad_attn[i] = T(0);
          a.grad_loc[2 * i] = T(0);
          a.grad_loc[2 * i + 1] = T(0);
          continue;
        }
        const T aw = a.attn[i];
        // g[k] = <grad_out, value at corner k>
        T g0 = T(0), g1 = T(0), g2 = T(0), g3 = T(0);
        if (c.all) {
          const T* __restrict__ v0 = level + c.offset[0];
          const T* __restrict__ v1 = level + c.offset[1];
          const T* __restrict__ v2 = level + c.offset[2];
          const T* __restrict__ v3 = level + c.offset[3];
          T* __restrict__ gv0 = glevel + c.offset[0];
          T* __restrict__ gv1 = glevel + c.offset[1];
          T* __restrict__ gv2 = glevel + c.offset[2];
          T* __restrict__ gv3 = glevel + c.offset[3];
          const T c0 = aw * c.w[0], c1 = aw * c.w[1], c2 = aw * c.w[2], c3 = aw * c.w[3];
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
          for (int k = 0; k < 4; ++k) {
            if (!c.valid[k]) {
              continue;
            }
            const T* __restrict__ v = level + c.offset[k];
            T* __restrict__ gvk = glevel + c.offset[k];
            const T ck = aw * c.w[k];
            T gk = T(0);
            SDETR_PRAGMA(omp simd reduction(+ : gk))
            for (int64_t d = 0; d < D; ++d) {
              const T gd = go[d];
              gk += gd * v[d];
              gvk[d] += ck * gd;
            }
            g[k] = gk;
          }
          g0 = g[0];
          g1 = g[1];
          g2 = g[2];
          g3 = g[3];
        }
        const T fx = c.fx, fy = c.fy;
        a.grad_attn[i] = c.w[0] * g0 + c.w[1] * g1 + c.w[2] * g2 + c.w[3] * g3;
        // d x / d loc_x = W, d y / d loc_y = H.
        a.grad_loc[2 * i] = aw * static_cast<T>(W) * ((T(1) - fy) * (g1 - g0) + fy * (g3 - g2));
        a.grad_loc[2 * i + 1] = aw * static_cast<T>(H) * ((T(1) - fx) * (g2 - g0) + fx * (g3 - g1));
      }
    }
  }
}

// Entry points per ISA. The always-inline kernels above are compiled into each of them.
template <typename T, int kD>
void forward_rows_base(const Args<T>& a, int64_t b, int64_t e) {
  forward_rows<T, kD>(a, b, e);
}
template <typename T, int kD>
void backward_task_base(const Args<T>& a, int64_t n, int64_t m, int64_t qb, int64_t qe, T* gv) {
  backward_task<T, kD>(a, n, m, qb, qe, gv);
}
#ifdef SDETR_X86_MULTIVERSION
template <typename T, int kD>
__attribute__((target("avx2,fma"))) void forward_rows_avx2(const Args<T>& a, int64_t b, int64_t e) {
  forward_rows<T, kD>(a, b, e);
}
template <typename T, int kD>
__attribute__((target("avx2,fma"))) void backward_task_avx2(const Args<T>& a, int64_t n, int64_t m, int64_t qb,
                                                              int64_t qe, T* gv) {
  backward_task<T, kD>(a, n, m, qb, qe, gv);
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
using BackwardFn = void (*)(const Args<T>&, int64_t, int64_t, int64_t, int64_t, T*);

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
  }
  return {shapes, starts};
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
  auto grad_value = at::zeros(v.sizes(), v.options());
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_attn.numel() > 0 && s.D == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
  } else if (grad_attn.numel() > 0) {
    // Tasks (n, m, chunk); see the note at the top of the file.
    const int64_t heads = s.N * s.M;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t chunks = 1;
    if (heads < threads && !at::in_parallel_region()) {
      chunks = std::min<int64_t>((threads + heads - 1) / heads, std::max<int64_t>(1, s.Lq / 64));
    }
    std::vector<at::Tensor> extra;
    for (int64_t c = 1; c < chunks; ++c) {
      extra.push_back(at::zeros(v.sizes(), v.options()));
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
          const int64_t m = (t / chunks) % s.M;
          const int64_t n = t / (chunks * s.M);
          const int64_t q_begin = s.Lq * c / chunks, q_end = s.Lq * (c + 1) / chunks;
          fn(a, n, m, q_begin, q_end, buffers[c]);
        }
      });
    });
    for (auto& t : extra) {
      grad_value.add_(t);
    }
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace sdetr
