// CPU backend of sdetr::kda (key-aware deformable attention) and its backward; shapes in ../kda.cpp.
//
// Per (image n, query q, head m), with the L * P sampling points i:
//   forward   k_i, v_i = bilinear samples of key / value;  s_i = q . k_i / sqrt(D);  a = softmax(s);
//             o = sum_i a_i v_i. One pass over the points with an online softmax (running maximum and
//             denominator, the accumulator rescaled when the maximum grows), so every corner is read once;
//             with keys = values (key None) the one sample v_i also gives the score.
//   backward  ga_i = go . v_i;  gs_i = a_i (ga_i - sum_j a_j ga_j) (+ the same with the weights' own
//             gradient when given);  grad q = sum_i gs_i k_i / sqrt(D);  value corners get w_c a_i go, key
//             corners w_c gs_i q / sqrt(D) (both to the value when keys = values);  the locations get the
//             bilinear derivative of a_i (go . v_i) + gs_i / sqrt(D) (q . k_i).
// Layout: [N, S, M, D] keeps one head's D channels contiguous, so the channel loops vectorise (`omp simd`,
// -fopenmp-simd), and D = 32 (the R50 models' 256 / 8) is compiled with a fixed trip count.
//
// Parallelism (at::parallel_for): the forward over (n, q) rows; the backward over (n, m[, query chunk])
// tasks, each the only writer of grad_value[n, :, m, :] (and grad_key) unless the queries are split into
// chunks (more threads than N * M), in which case chunk c > 0 writes its own zeroed buffers, summed at the end.
// ISA: the kernels are compiled for the baseline ISA and, on x86 with GCC/Clang, again with
// target("avx2,fma"), chosen at run time; SDETR_MSDA_CPU_ISA=default (or ATEN_CPU_CAPABILITY=default)
// forces the baseline copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SDETR_KDA_X86_MULTIVERSION 1
#endif

#if defined(__GNUC__)
#define KDA_INLINE inline __attribute__((always_inline))
#define KDA_PRAGMA(x) _Pragma(#x)
#else
#define KDA_INLINE inline
#define KDA_PRAGMA(x)
#endif

namespace sdetr {
namespace {

// A sampling point resolved to its four corners (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename T>
struct Point {
  int64_t off[4];  // element offset of each corner from the level's first position
  T w[4];          // bilinear weights, 0 for corners outside the map (zeros padding)
  T fx, fy;        // fractional position inside the cell
  bool valid[4];   // corner inside the map
  bool any;        // some corner is inside the map
};

// grid_sample's convention (align_corners=False): pixel x = loc_x * W - 0.5.
template <typename T>
KDA_INLINE void locate(T lx, T ly, int64_t H, int64_t W, int64_t row, Point<T>& p) {
  const T x = lx * static_cast<T>(W) - T(0.5);
  const T y = ly * static_cast<T>(H) - T(0.5);
  p.any = x > T(-1) && y > T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H);  // false for NaN
  if (!p.any) {
    return;
  }
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  p.fx = x - xf;
  p.fy = y - yf;
  const bool vx0 = x0 >= 0, vx1 = x0 + 1 < W, vy0 = y0 >= 0, vy1 = y0 + 1 < H;
  p.valid[0] = vy0 && vx0;
  p.valid[1] = vy0 && vx1;
  p.valid[2] = vy1 && vx0;
  p.valid[3] = vy1 && vx1;
  p.w[0] = p.valid[0] ? (T(1) - p.fx) * (T(1) - p.fy) : T(0);
  p.w[1] = p.valid[1] ? p.fx * (T(1) - p.fy) : T(0);
  p.w[2] = p.valid[2] ? (T(1) - p.fx) * p.fy : T(0);
  p.w[3] = p.valid[3] ? p.fx * p.fy : T(0);
  // Outside corners get an in-range offset (weight 0), so that reads stay inside the map.
  const int64_t cx0 = std::min<int64_t>(std::max<int64_t>(x0, 0), W - 1);
  const int64_t cx1 = std::min<int64_t>(std::max<int64_t>(x0 + 1, 0), W - 1);
  const int64_t cy0 = std::min<int64_t>(std::max<int64_t>(y0, 0), H - 1);
  const int64_t cy1 = std::min<int64_t>(std::max<int64_t>(y0 + 1, 0), H - 1);
  p.off[0] = (cy0 * W + cx0) * row;
  p.off[1] = (cy0 * W + cx1) * row;
  p.off[2] = (cy1 * W + cx0) * row;
  p.off[3] = (cy1 * W + cx1) * row;
}

template <typename T>
struct Args {
  const T* query;         // [N, Lq, M, D]
  const T* value;         // [N, S, M, D]
  const T* key;           // [N, S, M, D], or nullptr: keys are the values
  const int64_t* shapes;  // [L, 2]
  const int64_t* starts;  // [L]
  const T* loc;           // [N, Lq, M, L, P, 2]
  T* out;                 // forward: [N, Lq, M, D]
  T* weights;             // forward: [N, Lq, M, L, P]
  const T* grad_out;      // backward: [N, Lq, M, D]
  const T* grad_w;        // backward: [N, Lq, M, L, P] or nullptr
  const T* attn;          // backward: the forward's weights
  T* grad_query;          // backward: [N, Lq, M, D]
  T* grad_loc;            // backward: [N, Lq, M, L, P, 2]
  int64_t N, S, M, D, Lq, L, P;
  T scale;  // 1 / sqrt(D)
};

// sample[d] = sum_c w_c * map[off_c + d]
template <typename T, int kD>
KDA_INLINE void sample(const T* map, const Point<T>& p, int64_t D, T* __restrict__ out) {
  const T* __restrict__ c0 = map + p.off[0];
  const T* __restrict__ c1 = map + p.off[1];
  const T* __restrict__ c2 = map + p.off[2];
  const T* __restrict__ c3 = map + p.off[3];
  const T w0 = p.w[0], w1 = p.w[1], w2 = p.w[2], w3 = p.w[3];
  KDA_PRAGMA(omp simd)
  for (int64_t d = 0; d < (kD > 0 ? kD : D); ++d) {
    out[d] = w0 * c0[d] + w1 * c1[d] + w2 * c2[d] + w3 * c3[d];
  }
}

// Forward for rows nq in [begin, end) of the flattened (n, q); `buf` holds L * P scores and 2 * D samples.
template <typename T, int kD>
KDA_INLINE void forward_rows(const Args<T>& a, int64_t begin, int64_t end, T* buf) {
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t M = a.M, L = a.L, P = a.P, row = M * D;
  T* scores = buf;
  T* vs = buf + L * P;  // sampled value
  T* ks = vs + D;       // sampled key (when separate)
  T acc_fixed[kD > 0 ? kD : 1];
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / a.Lq;
    for (int64_t m = 0; m < M; ++m) {
      const T* __restrict__ q = a.query + (nq * M + m) * D;
      T* o = a.out + (nq * M + m) * D;
      T* acc = kD > 0 ? acc_fixed : o;
      KDA_PRAGMA(omp simd)
      for (int64_t d = 0; d < D; ++d) {
        acc[d] = T(0);
      }
      const int64_t head = n * a.S * row + m * D;
      const int64_t pt0 = (nq * M + m) * L * P;
      T mx = -std::numeric_limits<T>::infinity(), denom = T(0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const int64_t level = head + a.starts[l] * row;
        for (int64_t pp = 0; pp < P; ++pp) {
          const int64_t i = l * P + pp;
          Point<T> p;
          locate(a.loc[2 * (pt0 + i)], a.loc[2 * (pt0 + i) + 1], H, W, row, p);
          T s = T(0);
          if (p.any) {
            sample<T, kD>(a.value + level, p, D, vs);
            const T* k = vs;
            if (a.key != nullptr) {
              sample<T, kD>(a.key + level, p, D, ks);
              k = ks;
            }
            KDA_PRAGMA(omp simd reduction(+ : s))
            for (int64_t d = 0; d < D; ++d) {
              s += q[d] * k[d];
            }
            s *= a.scale;
          }
          scores[i] = s;
          if (s > mx) {  // rescale what was accumulated under the old maximum
            const T r = std::exp(mx - s);
            denom *= r;
            KDA_PRAGMA(omp simd)
            for (int64_t d = 0; d < D; ++d) {
              acc[d] *= r;
            }
            mx = s;
          }
          const T e = std::exp(s - mx);
          denom += e;
          if (p.any) {
            KDA_PRAGMA(omp simd)
            for (int64_t d = 0; d < D; ++d) {
              acc[d] += e * vs[d];
            }
          }
        }
      }
      const T inv = T(1) / denom;
      KDA_PRAGMA(omp simd)
      for (int64_t d = 0; d < D; ++d) {
        o[d] = acc[d] * inv;
      }
      for (int64_t i = 0; i < L * P; ++i) {
        a.weights[pt0 + i] = std::exp(scores[i] - mx) * inv;
      }
    }
  }
}

// Backward for queries [q_begin, q_end) of head m in image n. gv / gk: [N, S, M, D] gradient buffers written
// by this task only (gk nullptr when keys are the values). `buf` holds L * P * (D + 10) scratch values.
template <typename T, int kD>
KDA_INLINE void backward_task(const Args<T>& a, int64_t n, int64_t m, int64_t q_begin, int64_t q_end, T* gv, T* gk,
                              T* buf) {
  const int64_t D = kD > 0 ? kD : a.D;
  const int64_t M = a.M, L = a.L, P = a.P, LP = L * P, row = M * D;
  const bool shared = a.key == nullptr;
  T* ksamp = buf;              // [LP, D] sampled keys
  T* vdot = ksamp + LP * D;    // [LP, 4] go . value corner
  T* qdot = vdot + LP * 4;     // [LP, 4] q . key corner
  T* ga = qdot + LP * 4;       // [LP]   go . v_i
  T* gs = ga + LP;             // [LP]   gradient of the score
  std::vector<Point<T>> pts(static_cast<size_t>(LP));
  T gq_fixed[kD > 0 ? kD : 1];
  const int64_t head = n * a.S * row + m * D;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t nqm = (n * a.Lq + q) * M + m;
    const T* __restrict__ go = a.grad_out + nqm * D;
    const T* __restrict__ qv = a.query + nqm * D;
    const T* __restrict__ at = a.attn + nqm * LP;
    // Pass 1: corners, their dot products with go and q, the sampled keys.
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
      const int64_t level = head + a.starts[l] * row;
      for (int64_t pp = 0; pp < P; ++pp) {
        const int64_t i = l * P + pp;
        Point<T>& p = pts[i];
        locate(a.loc[2 * (nqm * LP + i)], a.loc[2 * (nqm * LP + i) + 1], H, W, row, p);
        T* kd = ksamp + i * D;
        if (!p.any) {
          for (int c = 0; c < 4; ++c) {
            vdot[4 * i + c] = qdot[4 * i + c] = T(0);
          }
          KDA_PRAGMA(omp simd)
          for (int64_t d = 0; d < D; ++d) {
            kd[d] = T(0);
          }
          ga[i] = T(0);
          continue;
        }
        // One read of each corner: its dot products with go and q, and the sampled key.
        KDA_PRAGMA(omp simd)
        for (int64_t d = 0; d < D; ++d) {
          kd[d] = T(0);
        }
        T gsum = T(0);
        for (int c = 0; c < 4; ++c) {
          const T* __restrict__ vc = a.value + level + p.off[c];
          const T* __restrict__ kc = shared ? vc : a.key + level + p.off[c];
          const T w = p.w[c];
          T dv = T(0), dk = T(0);
          KDA_PRAGMA(omp simd reduction(+ : dv, dk))
          for (int64_t d = 0; d < D; ++d) {
            dv += go[d] * vc[d];
            dk += qv[d] * kc[d];
            kd[d] += w * kc[d];
          }
          // Outside corners are zeros padding: no contribution.
          vdot[4 * i + c] = p.valid[c] ? dv : T(0);
          qdot[4 * i + c] = p.valid[c] ? dk : T(0);
          gsum += w * dv;
        }
        ga[i] = gsum;
      }
    }
    // Softmax backward (score gradient), adding the weights' own gradient when given.
    T sum_ag = T(0), sum_aw = T(0);
    const T* gw = a.grad_w != nullptr ? a.grad_w + nqm * LP : nullptr;
    for (int64_t i = 0; i < LP; ++i) {
      sum_ag += at[i] * ga[i];
      if (gw != nullptr) {
        sum_aw += at[i] * gw[i];
      }
    }
    for (int64_t i = 0; i < LP; ++i) {
      gs[i] = at[i] * (ga[i] - sum_ag) + (gw != nullptr ? at[i] * (gw[i] - sum_aw) : T(0));
    }
    // Pass 2: scatter into the value / key gradients, the query and location gradients.
    T* gq = kD > 0 ? gq_fixed : a.grad_query + nqm * D;
    KDA_PRAGMA(omp simd)
    for (int64_t d = 0; d < D; ++d) {
      gq[d] = T(0);
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
      const int64_t level = head + a.starts[l] * row;
      for (int64_t pp = 0; pp < P; ++pp) {
        const int64_t i = l * P + pp;
        const Point<T>& p = pts[i];
        T* gl = a.grad_loc + 2 * (nqm * LP + i);
        if (!p.any) {
          gl[0] = gl[1] = T(0);
          continue;
        }
        const T cv = at[i], ck = gs[i] * a.scale;
        const T* __restrict__ kd = ksamp + i * D;
        KDA_PRAGMA(omp simd)
        for (int64_t d = 0; d < D; ++d) {
          gq[d] += ck * kd[d];
        }
        for (int c = 0; c < 4; ++c) {
          const T w = p.w[c];
          if (w == T(0)) {
            continue;
          }
          T* __restrict__ gvc = gv + level + p.off[c];
          const T wv = w * cv, wk = w * ck;
          if (shared) {
            KDA_PRAGMA(omp simd)
            for (int64_t d = 0; d < D; ++d) {
              gvc[d] += wv * go[d] + wk * qv[d];
            }
          } else {
            T* __restrict__ gkc = gk + level + p.off[c];
            KDA_PRAGMA(omp simd)
            for (int64_t d = 0; d < D; ++d) {
              gvc[d] += wv * go[d];
              gkc[d] += wk * qv[d];
            }
          }
        }
        T g[4];
        for (int c = 0; c < 4; ++c) {
          g[c] = cv * vdot[4 * i + c] + ck * qdot[4 * i + c];
        }
        const T fx = p.fx, fy = p.fy;
        gl[0] = static_cast<T>(W) * ((T(1) - fy) * (g[1] - g[0]) + fy * (g[3] - g[2]));
        gl[1] = static_cast<T>(H) * ((T(1) - fx) * (g[2] - g[0]) + fx * (g[3] - g[1]));
      }
    }
    if (kD > 0) {
      T* dst = a.grad_query + nqm * D;
      KDA_PRAGMA(omp simd)
      for (int64_t d = 0; d < D; ++d) {
        dst[d] = gq[d];
      }
    }
  }
}

template <typename T, int kD>
void forward_base(const Args<T>& a, int64_t b, int64_t e, T* buf) {
  forward_rows<T, kD>(a, b, e, buf);
}
template <typename T, int kD>
void backward_base(const Args<T>& a, int64_t n, int64_t m, int64_t qb, int64_t qe, T* gv, T* gk, T* buf) {
  backward_task<T, kD>(a, n, m, qb, qe, gv, gk, buf);
}
#ifdef SDETR_KDA_X86_MULTIVERSION
template <typename T, int kD>
__attribute__((target("avx2,fma"))) void forward_avx2(const Args<T>& a, int64_t b, int64_t e, T* buf) {
  forward_rows<T, kD>(a, b, e, buf);
}
template <typename T, int kD>
__attribute__((target("avx2,fma"))) void backward_avx2(const Args<T>& a, int64_t n, int64_t m, int64_t qb,
                                                         int64_t qe, T* gv, T* gk, T* buf) {
  backward_task<T, kD>(a, n, m, qb, qe, gv, gk, buf);
}
#endif

bool use_avx2() {
#ifdef SDETR_KDA_X86_MULTIVERSION
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
using ForwardFn = void (*)(const Args<T>&, int64_t, int64_t, T*);
template <typename T>
using BackwardFn = void (*)(const Args<T>&, int64_t, int64_t, int64_t, int64_t, T*, T*, T*);

template <typename T, int kD>
ForwardFn<T> pick_forward() {
#ifdef SDETR_KDA_X86_MULTIVERSION
  if (use_avx2()) {
    return &forward_avx2<T, kD>;
  }
#endif
  return &forward_base<T, kD>;
}

template <typename T, int kD>
BackwardFn<T> pick_backward() {
#ifdef SDETR_KDA_X86_MULTIVERSION
  if (use_avx2()) {
    return &backward_avx2<T, kD>;
  }
#endif
  return &backward_base<T, kD>;
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

Sizes check_inputs(const at::Tensor& query, const at::Tensor& value, const std::optional<at::Tensor>& key,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& loc) {
  TORCH_CHECK(query.dim() == 4, "kda: query must be [N, Lq, M, D], got ", query.sizes());
  TORCH_CHECK(value.dim() == 4, "kda: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2, "kda: sampling_locations must be [N, Lq, M, L, P, 2], got ",
              loc.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3), query.size(1), loc.size(3), loc.size(4)};
  TORCH_CHECK(query.size(0) == s.N && query.size(2) == s.M && query.size(3) == s.D, "kda: query ", query.sizes(),
              " does not match value ", value.sizes(), " in N, M or D");
  TORCH_CHECK(loc.size(0) == s.N && loc.size(1) == s.Lq && loc.size(2) == s.M, "kda: sampling_locations ",
              loc.sizes(), " does not match query ", query.sizes(), " in N, Lq or M");
  if (key.has_value()) {
    TORCH_CHECK(key->sizes() == value.sizes(), "kda: key ", key->sizes(), " must have value's shape ", value.sizes());
    TORCH_CHECK(key->scalar_type() == value.scalar_type(), "kda: key and value must have the same dtype");
  }
  TORCH_CHECK(query.scalar_type() == value.scalar_type(), "kda: query and value must have the same dtype, got ",
              query.scalar_type(), " and ", value.scalar_type());
  TORCH_CHECK(is_float(value) && is_float(loc), "kda: query, value, key and sampling_locations must be float16, "
              "bfloat16, float32 or float64");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.L && spatial_shapes.size(1) == 2,
              "kda: spatial_shapes must be [L, 2] with L = ", s.L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "kda: level_start_index must be [L] with L = ", s.L, ", got ", level_start_index.sizes());
  TORCH_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) &&
                  !at::isFloatingType(level_start_index.scalar_type()),
              "kda: spatial_shapes and level_start_index must be integer tensors");
  for (const at::Tensor* t : {&query, &value, &loc}) {
    TORCH_CHECK(t->device().is_cpu(), "kda (CPU kernel): inputs must be on the CPU, got ", t->device());
  }
  return s;
}

std::pair<at::Tensor, at::Tensor> level_tables(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                               int64_t S) {
  auto shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  auto starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(sh[2 * l] >= 0 && sh[2 * l + 1] >= 0 && st[l] >= 0 && st[l] + sh[2 * l] * sh[2 * l + 1] <= S,
                "kda: level ", l, " (H=", sh[2 * l], ", W=", sh[2 * l + 1], ", start=", st[l],
                ") does not fit in value's S=", S);
  }
  return {shapes, starts};
}

at::ScalarType compute_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
void fill_sizes(Args<T>& a, const Sizes& s) {
  a.N = s.N;
  a.S = s.S;
  a.M = s.M;
  a.D = s.D;
  a.Lq = s.Lq;
  a.L = s.L;
  a.P = s.P;
  a.scale = T(1) / std::sqrt(static_cast<T>(std::max<int64_t>(s.D, 1)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kda_cpu(const at::Tensor& query, const at::Tensor& value,
                                           const std::optional<at::Tensor>& key, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations) {
  const Sizes s = check_inputs(query, value, key, spatial_shapes, level_start_index, sampling_locations);
  const auto ct = compute_type(value);
  const auto q = query.to(ct).contiguous();
  const auto v = value.to(ct).contiguous();
  const auto k = key.has_value() ? key->to(ct).contiguous() : at::Tensor();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto tables = level_tables(spatial_shapes, level_start_index, s.S);
  auto out = at::zeros({s.N, s.Lq, s.M * s.D}, v.options());
  auto weights = at::empty({s.N, s.Lq, s.M, s.L, s.P}, v.options());
  if (out.numel() > 0 && s.L * s.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "kda_cpu", [&] {
      Args<scalar_t> a{};
      a.query = q.data_ptr<scalar_t>();
      a.value = v.data_ptr<scalar_t>();
      a.key = k.defined() ? k.data_ptr<scalar_t>() : nullptr;
      a.shapes = tables.first.data_ptr<int64_t>();
      a.starts = tables.second.data_ptr<int64_t>();
      a.loc = loc.data_ptr<scalar_t>();
      a.out = out.data_ptr<scalar_t>();
      a.weights = weights.data_ptr<scalar_t>();
      fill_sizes(a, s);
      const ForwardFn<scalar_t> fn = s.D == 32 ? pick_forward<scalar_t, 32>() : pick_forward<scalar_t, 0>();
      const int64_t work_per_row = std::max<int64_t>(1, s.M * s.L * s.P * s.D);
      const int64_t grain = std::max<int64_t>(1, 65536 / work_per_row);
      at::parallel_for(0, s.N * s.Lq, grain, [&](int64_t b, int64_t e) {
        std::vector<scalar_t> buf(static_cast<size_t>(s.L * s.P + 2 * s.D));
        fn(a, b, e, buf.data());
      });
    });
  } else if (weights.numel() > 0) {
    weights.fill_(1.0 / static_cast<double>(s.L * s.P));  // D = 0: all scores 0
  }
  return {out.to(value.scalar_type()), weights.to(value.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kda_backward_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_attention_weights,
    const at::Tensor& query, const at::Tensor& value, const std::optional<at::Tensor>& key,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(query, value, key, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK(grad_output.numel() == s.N * s.Lq * s.M * s.D,
              "kda_backward: grad_output must have N * Lq * M * D elements, got shape ", grad_output.sizes());
  TORCH_CHECK(attention_weights.numel() == s.N * s.Lq * s.M * s.L * s.P,
              "kda_backward: attention_weights must be [N, Lq, M, L, P], got ", attention_weights.sizes());
  const bool has_gw = grad_attention_weights.has_value() && grad_attention_weights->defined();
  if (has_gw) {
    TORCH_CHECK(grad_attention_weights->numel() == attention_weights.numel(),
                "kda_backward: grad_attention_weights must be [N, Lq, M, L, P], got ",
                grad_attention_weights->sizes());
  }
  const auto ct = compute_type(value);
  const auto q = query.to(ct).contiguous();
  const auto v = value.to(ct).contiguous();
  const auto k = key.has_value() ? key->to(ct).contiguous() : at::Tensor();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto go = grad_output.to(at::kCPU, ct).contiguous();
  const auto attn = attention_weights.to(at::kCPU, ct).contiguous();
  const auto gw = has_gw ? grad_attention_weights->to(at::kCPU, ct).contiguous() : at::Tensor();
  const auto tables = level_tables(spatial_shapes, level_start_index, s.S);
  // grad_query and grad_loc are written in full by the kernel (zeroed here only when it does not run).
  const bool run = q.numel() > 0 && s.L * s.P > 0;
  auto grad_query = run ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  auto grad_value = at::zeros(v.sizes(), v.options());
  auto grad_key = k.defined() ? at::zeros(k.sizes(), k.options()) : at::empty({0}, v.options());
  auto grad_loc = run ? at::empty(loc.sizes(), loc.options()) : at::zeros(loc.sizes(), loc.options());
  if (run) {
    const int64_t heads = s.N * s.M;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t chunks = 1;
    if (heads < threads && !at::in_parallel_region()) {
      chunks = std::min<int64_t>((threads + heads - 1) / heads, std::max<int64_t>(1, s.Lq / 64));
    }
    std::vector<at::Tensor> extra_v, extra_k;
    for (int64_t c = 1; c < chunks; ++c) {
      extra_v.push_back(at::zeros(v.sizes(), v.options()));
      extra_k.push_back(k.defined() ? at::zeros(k.sizes(), k.options()) : at::Tensor());
    }
    AT_DISPATCH_FLOATING_TYPES(ct, "kda_backward_cpu", [&] {
      Args<scalar_t> a{};
      a.query = q.data_ptr<scalar_t>();
      a.value = v.data_ptr<scalar_t>();
      a.key = k.defined() ? k.data_ptr<scalar_t>() : nullptr;
      a.shapes = tables.first.data_ptr<int64_t>();
      a.starts = tables.second.data_ptr<int64_t>();
      a.loc = loc.data_ptr<scalar_t>();
      a.grad_out = go.data_ptr<scalar_t>();
      a.grad_w = has_gw ? gw.data_ptr<scalar_t>() : nullptr;
      a.attn = attn.data_ptr<scalar_t>();
      a.grad_query = grad_query.data_ptr<scalar_t>();
      a.grad_loc = grad_loc.data_ptr<scalar_t>();
      fill_sizes(a, s);
      std::vector<scalar_t*> gv_bufs{grad_value.data_ptr<scalar_t>()};
      std::vector<scalar_t*> gk_bufs{k.defined() ? grad_key.data_ptr<scalar_t>() : nullptr};
      for (int64_t c = 1; c < chunks; ++c) {
        gv_bufs.push_back(extra_v[c - 1].data_ptr<scalar_t>());
        gk_bufs.push_back(k.defined() ? extra_k[c - 1].data_ptr<scalar_t>() : nullptr);
      }
      const BackwardFn<scalar_t> fn = s.D == 32 ? pick_backward<scalar_t, 32>() : pick_backward<scalar_t, 0>();
      at::parallel_for(0, heads * chunks, 1, [&](int64_t b, int64_t e) {
        std::vector<scalar_t> buf(static_cast<size_t>(s.L * s.P * (s.D + 10)));
        for (int64_t t = b; t < e; ++t) {
          const int64_t c = t % chunks;
          const int64_t m = (t / chunks) % s.M;
          const int64_t n = t / (chunks * s.M);
          fn(a, n, m, s.Lq * c / chunks, s.Lq * (c + 1) / chunks, gv_bufs[c], gk_bufs[c], buf.data());
        }
      });
    });
    for (int64_t c = 1; c < chunks; ++c) {
      grad_value.add_(extra_v[c - 1]);
      if (k.defined()) {
        grad_key.add_(extra_k[c - 1]);
      }
    }
  }
  return {grad_query.to(query.scalar_type()), grad_value.to(value.scalar_type()),
          grad_key.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type())};
}

}  // namespace sdetr
