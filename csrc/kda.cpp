// Key-aware deformable attention (Lite DETR, Li et al., CVPR 2023) as the torch ops sdetr::kda and
// sdetr::kda_backward: schema, input checks and the CPU registration. The `sdetr` library itself is defined
// in ms_deform_attn.cpp; autograd, the fake (meta) implementation, the FLOP formula and the GPU (Triton)
// implementation are registered from Python in sdetr.detector.ops.kda.
//
// Shapes:
//   query               [N, Lq, M, D]         projected queries, per head
//   value               [N, S, M, D]          projected values of all levels, flattened and concatenated
//   key                 [N, S, M, D] or None  projected keys; None: keys are the values (Lite DETR's
//                                             released configuration, proj_key=False): one bilinear
//                                             sample then serves as both key and value
//   spatial_shapes      int64 [L, 2]          (H_l, W_l)
//   level_start_index   int64 [L]             offset of level l in S
//   sampling_locations  [N, Lq, M, L, P, 2]   normalised (x, y); pixel x = loc_x * W - 0.5
//   -> output [N, Lq, M * D], attention_weights [N, Lq, M, L, P]
//
//   attention_weights = softmax over the L * P points of q . k_lp / sqrt(D); output = sum_lp a_lp v_lp, with
//   k_lp, v_lp bilinear samples (zeros padding, align_corners=False, as grid_sample).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace sdetr {

std::tuple<at::Tensor, at::Tensor> kda_cpu(const at::Tensor& query, const at::Tensor& value,
                                           const std::optional<at::Tensor>& key, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kda_backward_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_attention_weights,
    const at::Tensor& query, const at::Tensor& value, const std::optional<at::Tensor>& key,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace sdetr

TORCH_LIBRARY_FRAGMENT(sdetr, m) {
  m.set_python_module("sdetr.detector.ops.kda");
  m.def(
      "kda(Tensor query, Tensor value, Tensor? key, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns grad_query, grad_value, grad_key (an empty tensor when key is None), grad_sampling_locations.
  m.def(
      "kda_backward(Tensor grad_output, Tensor? grad_attention_weights, Tensor query, Tensor value, "
      "Tensor? key, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(sdetr, CPU, m) {
  m.impl("kda", &sdetr::kda_cpu);
  m.impl("kda_backward", &sdetr::kda_backward_cpu);
}
