// Opt-in CUDA C++ backend of sdetr::ms_deform_attn and its backward (built with SDETR_MSDA_CUDA=1, used with
// SDETR_MSDA_CUDA_IMPL=cpp; the default CUDA kernels are Triton's, sdetr/detector/ops/triton_msda.py):
// fp32, fp64, fp16 and bf16 values, any batch size.
//
// Arithmetic runs in acc_t = at::acc_type<scalar_t, true> (float for fp16/bf16/fp32, double for fp64):
// sampling locations and attention weights are converted to acc_t, value is read in its own dtype and
// converted per element, and grad_value is accumulated with atomics into an acc_t buffer (a separate
// fp32 buffer for fp16/bf16, cast at the end).
//
// Thread mapping: a group of G lanes (G = next power of two >= D, at most 32) handles one (n, q, m);
// lane j handles the channels d = j, j + G, ... so that the value reads of a group are coalesced
// (value is [N, S, M, D]: the D channels of a head are contiguous). In the backward pass the per-point
// sums over channels (for grad_attention_weights and grad_sampling_locations) are reduced within the
// group with warp shuffles; all control flow around the shuffles is warp-uniform.
//
// Unlike the CPU backend, level tables are not checked against S here (that would need a device sync).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../ms_deform_attn.h"

namespace sdetr {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename acc_t>
struct Corners {
  int64_t offset[4];  // element offset of corners (y0,x0), (y0,x1), (y1,x0), (y1,x1) from the level start
  acc_t w[4];         // bilinear weights
  bool valid[4];      // inside the map (zeros padding)
  bool any;
  acc_t fx, fy;
};

// grid_sample, align_corners=False: pixel x = loc_x * W - 0.5.
template <typename acc_t>
__device__ __forceinline__ void locate(acc_t lx, acc_t ly, int64_t H, int64_t W, int64_t row, Corners<acc_t>& c) {
  const acc_t x = lx * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = ly * static_cast<acc_t>(H) - acc_t(0.5);
  c.any = x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H);
  if (!c.any) {
    return;
  }
  const acc_t xf = floor(x);
  const acc_t yf = floor(y);
  const int64_t x0 = static_cast<int64_t>(xf);
  const int64_t y0 = static_cast<int64_t>(yf);
  const acc_t fx = x - xf;
  const acc_t fy = y - yf;
  c.fx = fx;
  c.fy = fy;
  const bool vx0 = x0 >= 0, vx1 = x0 + 1 < W, vy0 = y0 >= 0, vy1 = y0 + 1 < H;
  c.valid[0] = vy0 && vx0;
  c.valid[1] = vy0 && vx1;
  c.valid[2] = vy1 && vx0;
  c.valid[3] = vy1 && vx1;
  c.w[0] = (acc_t(1) - fx) * (acc_t(1) - fy);
  c.w[1] = fx * (acc_t(1) - fy);
  c.w[2] = (acc_t(1) - fx) * fy;
  c.w[3] = fx * fy;
  const int64_t base = (y0 * W + x0) * row;
  c.offset[0] = base;
  c.offset[1] = base + row;
  c.offset[2] = base + W * row;
  c.offset[3] = base + (W + 1) * row;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                        const acc_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t groups, int64_t Lq,
                        int64_t S, int M, int D, int L, int P, int G) {
  const int lane = threadIdx.x & (G - 1);
  const int64_t row = static_cast<int64_t>(M) * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / G);
  for (int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G; g < groups; g += stride) {
    const int m = static_cast<int>(g % M);
    const int64_t n = g / M / Lq;
    const scalar_t* head = value + n * S * row + static_cast<int64_t>(m) * D;
    const acc_t* gloc = loc + g * L * P * 2;
    const acc_t* gattn = attn + g * L * P;
    for (int d = lane; d < D; d += G) {
      acc_t acc = acc_t(0);
      for (int l = 0; l < L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        const scalar_t* level = head + starts[l] * row + d;
        for (int p = 0; p < P; ++p) {
          const int i = l * P + p;
          Corners<acc_t> c;
          locate(gloc[2 * i], gloc[2 * i + 1], H, W, row, c);
          if (!c.any) {
            continue;
          }
          acc_t s = acc_t(0);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.valid[k]) {
              s += c.w[k] * static_cast<acc_t>(level[c.offset[k]]);
            }
          }
          acc += gattn[i] * s;
        }
      }
      out[g * D + d] = static_cast<scalar_t>(acc);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int offset = G / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    msda_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                         const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                         const acc_t* __restrict__ loc, const acc_t* __restrict__ attn, acc_t* __restrict__ grad_value,
                         acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn, int64_t groups, int64_t Lq,
                         int64_t S, int M, int D, int L, int P, int G) {
  const int lane = threadIdx.x & (G - 1);
  const int groups_per_warp = kWarp / G;
  const int sub = (threadIdx.x & (kWarp - 1)) / G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t row = static_cast<int64_t>(M) * D;
  // `base` is the same for all lanes of a warp, so the loop (and every shuffle in it) is warp-uniform.
  for (int64_t base = warp * groups_per_warp; base < groups; base += warps * groups_per_warp) {
    const int64_t g_raw = base + sub;
    const bool active = g_raw < groups;
    const int64_t g = active ? g_raw : 0;
    const int m = static_cast<int>(g % M);
    const int64_t n = g / M / Lq;
    const int64_t head_off = n * S * row + static_cast<int64_t>(m) * D;
    const acc_t* gloc = loc + g * L * P * 2;
    const acc_t* gattn = attn + g * L * P;
    const scalar_t* go = grad_out + g * D;
    for (int l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const int64_t level_off = head_off + starts[l] * row;
      for (int p = 0; p < P; ++p) {
        const int i = l * P + p;
        Corners<acc_t> c;
        c.any = false;
        acc_t aw = acc_t(0);
        if (active) {
          locate(gloc[2 * i], gloc[2 * i + 1], H, W, row, c);
          aw = gattn[i];
        }
        // Per-lane partial sums over its channels of grad_out * (sampled value, d sampled / dx, / dy).
        acc_t pa = acc_t(0), px = acc_t(0), py = acc_t(0);
        if (c.any) {
          const acc_t fx = c.fx, fy = c.fy;
          for (int d = lane; d < D; d += G) {
            const acc_t gd = static_cast<acc_t>(go[d]);
            acc_t v[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              v[k] = acc_t(0);
              if (c.valid[k]) {
                const int64_t idx = level_off + c.offset[k] + d;
                v[k] = static_cast<acc_t>(value[idx]);
                gpuAtomicAdd(grad_value + idx, aw * c.w[k] * gd);
              }
            }
            pa += gd * (c.w[0] * v[0] + c.w[1] * v[1] + c.w[2] * v[2] + c.w[3] * v[3]);
            px += gd * ((acc_t(1) - fy) * (v[1] - v[0]) + fy * (v[3] - v[2]));
            py += gd * ((acc_t(1) - fx) * (v[2] - v[0]) + fx * (v[3] - v[1]));
          }
        }
        pa = group_sum(pa, G);
        px = group_sum(px, G);
        py = group_sum(py, G);
        if (active && lane == 0) {
          const int64_t j = g * L * P + i;
          grad_attn[j] = pa;
          grad_loc[2 * j] = aw * static_cast<acc_t>(W) * px;
          grad_loc[2 * j + 1] = aw * static_cast<acc_t>(H) * py;
        }
      }
    }
  }
}

int lanes_per_group(int64_t D) {
  int G = 1;
  while (G < D && G < kWarp) {
    G *= 2;
  }
  return G;
}

int64_t num_blocks(int64_t groups, int G) {
  const int64_t groups_per_block = kThreads / G;
  const int64_t blocks = (groups + groups_per_block - 1) / groups_per_block;
  // The kernels loop over groups, so the grid can be capped.
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20));
}

void check_cuda(const at::Tensor& t, const at::Tensor& value, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == value.device(), "ms_deform_attn (CUDA kernel): ", name,
              " must be on the CUDA device of value (", value.device(), "), got ", t.device());
}

at::ScalarType acc_dtype(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const MsdaSizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor, got ", value.device());
  check_cuda(sampling_locations, value, "sampling_locations");
  check_cuda(attention_weights, value, "attention_weights");
  TORCH_CHECK(s.M * s.D <= INT32_MAX && s.L * s.P <= INT32_MAX, "ms_deform_attn: M * D or L * P too large");
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc = acc_dtype(value);
  const auto v = value.contiguous();
  const auto loc = sampling_locations.to(acc).contiguous();
  const auto attn = attention_weights.to(acc).contiguous();
  const auto shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  const auto starts = level_start_index.to(value.device(), at::kLong).contiguous();
  auto out = at::empty({s.N, s.Lq, s.M * s.D}, v.options());
  if (out.numel() == 0) {
    return out;
  }
  if (s.L * s.P == 0) {
    return out.zero_();
  }
  const int64_t groups = s.N * s.Lq * s.M;
  const int G = lanes_per_group(s.D);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    msda_forward_kernel<scalar_t, acc_t><<<num_blocks(groups, G), kThreads, 0, stream>>>(
        v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(),
        attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), groups, s.Lq, s.S, static_cast<int>(s.M),
        static_cast<int>(s.D), static_cast<int>(s.L), static_cast<int>(s.P), G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.numel() == s.N * s.Lq * s.M * s.D,
              "ms_deform_attn_backward: grad_output must have N * Lq * M * D elements, got shape ",
              grad_output.sizes());
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor, got ", value.device());
  check_cuda(grad_output, value, "grad_output");
  check_cuda(sampling_locations, value, "sampling_locations");
  check_cuda(attention_weights, value, "attention_weights");
  TORCH_CHECK(s.M * s.D <= INT32_MAX && s.L * s.P <= INT32_MAX, "ms_deform_attn: M * D or L * P too large");
  // grad_value is accumulated with atomics, in an order that varies between runs.
  at::globalContext().alertNotDeterministic("sdetr::ms_deform_attn_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc = acc_dtype(value);
  const auto v = value.contiguous();
  const auto go = grad_output.to(value.scalar_type()).contiguous();
  const auto loc = sampling_locations.to(acc).contiguous();
  const auto attn = attention_weights.to(acc).contiguous();
  const auto shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  const auto starts = level_start_index.to(value.device(), at::kLong).contiguous();
  // For fp32/fp64 the accumulation buffer is grad_value itself.
  auto grad_value_acc = at::zeros(v.sizes(), v.options().dtype(acc));
  auto grad_loc = at::zeros(loc.sizes(), loc.options());
  auto grad_attn = at::zeros(attn.sizes(), attn.options());
  const int64_t groups = s.N * s.Lq * s.M;
  if (groups > 0 && s.L * s.P > 0 && s.D > 0) {
    const int G = lanes_per_group(s.D);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      msda_backward_kernel<scalar_t, acc_t><<<num_blocks(groups, G), kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
          grad_attn.data_ptr<acc_t>(), groups, s.Lq, s.S, static_cast<int>(s.M), static_cast<int>(s.D),
          static_cast<int>(s.L), static_cast<int>(s.P), G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace sdetr

// The opt-in backend: its own ops, which the CUDA kernel of sdetr::ms_deform_attn (registered from Python,
// sdetr.detector.ops.cuda_impl) calls when SDETR_MSDA_CUDA_IMPL=cpp. The Triton kernels are the default.
TORCH_LIBRARY_FRAGMENT(sdetr, m) {
  m.def(
      "ms_deform_attn_cuda_cpp(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward_cuda_cpp(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sdetr, CUDA, m) {
  m.impl("ms_deform_attn_cuda_cpp", &sdetr::ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward_cuda_cpp", &sdetr::ms_deform_attn_backward_cuda);
}
