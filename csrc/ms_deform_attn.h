// Multi-scale deformable attention (Zhu et al., Deformable DETR) as the torch op sdetr::ms_deform_attn.
//
// Shapes (the official ones):
//   value               [N, S, M, D]          S = sum_l H_l * W_l, levels flattened and concatenated
//   spatial_shapes      int64 [L, 2]          (H_l, W_l)
//   level_start_index   int64 [L]             offset of level l in S
//   sampling_locations  [N, Lq, M, L, P, 2]   normalised (x, y); pixel x = loc_x * W - 0.5
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M * D]
//
// Sampling is bilinear with zeros padding and align_corners=False, exactly as
// torch.nn.functional.grid_sample in the pure-PyTorch reference (sdetr.detector.ms_deform_attn).
//
// Dtypes: the output and grad_value have value's dtype, grad_sampling_locations and
// grad_attention_weights those of their inputs. Arithmetic runs in the accumulation type of value
// (float for fp16/bf16/fp32, double for fp64): locations and weights are converted to it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace sdetr {

// Sizes of one call, checked by check_inputs.
struct MsdaSizes {
  int64_t N, S, M, D, Lq, L, P;
};

// Validates ranks, sizes and dtypes (device placement is checked by each backend).
MsdaSizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights);

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace sdetr
