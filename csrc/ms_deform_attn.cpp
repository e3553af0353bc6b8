// Schema of the sdetr ops, shared input checks and the CPU registration.
// The CUDA kernels register themselves in cuda/ms_deform_attn_cuda.cu when that file is compiled in.
// Autograd, the fake (meta) implementation and the FLOP formula are registered from Python in
// sdetr.detector.ops.registrations, which set_python_module names so that torch can find them.
#include "ms_deform_attn.h"

#include <torch/library.h>

namespace sdetr {

namespace {

bool is_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

}  // namespace

MsdaSizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be [N, Lq, M, L, P], got ", attention_weights.sizes());
  MsdaSizes s{value.size(0),
              value.size(1),
              value.size(2),
              value.size(3),
              sampling_locations.size(1),
              sampling_locations.size(3),
              sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes(), " in N or M");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(),
              " must be sampling_locations.shape[:-1] = ", sampling_locations.sizes().slice(0, 5));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2] with L = ", s.L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "ms_deform_attn: level_start_index must be [L] with L = ", s.L, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) &&
                  !at::isFloatingType(level_start_index.scalar_type()),
              "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors");
  TORCH_CHECK(is_float_dtype(value) && is_float_dtype(sampling_locations) && is_float_dtype(attention_weights),
              "ms_deform_attn: value, sampling_locations and attention_weights must be float16, bfloat16, "
              "float32 or float64; got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  return s;
}

}  // namespace sdetr

TORCH_LIBRARY(sdetr, m) {
  m.set_python_module("sdetr.detector.ops.registrations");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(sdetr, CPU, m) {
  m.impl("ms_deform_attn", &sdetr::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &sdetr::ms_deform_attn_backward_cpu);
}
