"""What torch needs around the kernels: autograd, fake (meta) implementations for
``torch.compile``/``FakeTensorMode``, FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``, the
CUDA kernel (Triton, `cuda_impl`) and the autocast rule.

The op's schema comes from the C++ library (``csrc/ms_deform_attn.cpp``), which also holds the CPU kernels.
When that library cannot be built (no compiler), `define_schema` defines the same schema from Python so
that the Triton kernels still serve CUDA tensors; the CPU then has no kernel for the op (the model uses the
pure-PyTorch path there), and the C++ library cannot be loaded later in that process.

Autocast (CPU and CUDA): sampling_locations and attention_weights are cast to float32 (a bf16 location is
off by up to 0.4 px on a 107-px map), value keeps its dtype (the kernels read fp16/bf16 values and
accumulate in float32); the output has value's dtype.

The C++ library names this module (``set_python_module``): torch imports it when it needs the fake
implementation of an op that was loaded without it.
"""

from __future__ import annotations

import threading

import torch

from sdetr.detector.ops.flops import ms_deform_attn_flop_counter_flops
from sdetr.detector.ops.kda import register_kda

SCHEMAS = (
    "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
    "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
    "-> (Tensor, Tensor, Tensor)",
)
_lock = threading.Lock()
_python_registered = False
# torch.library.Library objects own their registrations: kept for the life of the process.
_libraries: list = []
schema_from_python = False
cuda_registered = False  # the Python CUDA kernel (Triton / opt-in C++) is registered


def op_loaded() -> bool:
    try:
        torch.ops.sdetr.ms_deform_attn  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def define_schema() -> None:
    """Define the ops from Python (same schemas and tags as the C++ library), when it is not loaded."""
    global schema_from_python
    with _lock:
        if op_loaded():
            return
        lib = torch.library.Library("sdetr", "DEF")
        for schema in SCHEMAS:
            lib.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
        _libraries.append(lib)
        schema_from_python = True


def _to_fp32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast_kernel(dispatch_key):
    def kernel(keyset, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            loc, attn = _to_fp32(sampling_locations), _to_fp32(attention_weights)
            return torch.ops.sdetr.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)

    return kernel


def _register_cuda_and_autocast() -> None:
    global cuda_registered
    from sdetr.detector.ops import cuda_impl

    lib = torch.library.Library("sdetr", "IMPL")
    if cuda_impl.triton_available() or cuda_impl.cpp_cuda_kernels():
        lib.impl("ms_deform_attn", cuda_impl.forward_cuda, "CUDA")
        lib.impl("ms_deform_attn_backward", cuda_impl.backward_cuda, "CUDA")
        cuda_registered = True
    for device in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device)
        kernel = _autocast_kernel(getattr(torch._C.DispatchKey, key))
        lib.impl("ms_deform_attn", kernel, key, with_keyset=True)
    _libraries.append(lib)


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    torch._check(value.dim() == 4, lambda: f"value must be [N, S, M, D], got {tuple(value.shape)}")
    torch._check(
        sampling_locations.dim() == 6,
        lambda: f"sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}",
    )
    torch._check(
        attention_weights.shape == sampling_locations.shape[:5],
        lambda: "attention_weights must be sampling_locations.shape[:-1]",
    )
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.sdetr.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    need = ctx.needs_input_grad
    return (
        grad_value if need[0] else None,
        None,
        None,
        grad_loc if need[3] else None,
        grad_attn if need[4] else None,
    )


def _flop_forward(
    value_shape, spatial_shapes_shape, level_start_index_shape, loc_shape, attn_shape, **kwargs
):
    return ms_deform_attn_flop_counter_flops(value_shape, loc_shape)


def _flop_backward(
    grad_shape, value_shape, spatial_shapes_shape, level_start_shape, loc_shape, attn_shape, **kw
):
    return ms_deform_attn_flop_counter_flops(value_shape, loc_shape, backward=True)


def register_python() -> None:
    global _python_registered
    with _lock:
        if _python_registered:
            return
        from torch.utils.flop_counter import register_flop_formula

        torch.library.register_fake("sdetr::ms_deform_attn")(_fake_forward)
        torch.library.register_fake("sdetr::ms_deform_attn_backward")(_fake_backward)
        torch.library.register_autograd("sdetr::ms_deform_attn", _backward, setup_context=_setup_context)
        register_flop_formula(torch.ops.sdetr.ms_deform_attn)(_flop_forward)
        register_flop_formula(torch.ops.sdetr.ms_deform_attn_backward)(_flop_backward)
        _register_cuda_and_autocast()
        register_kda()
        _python_registered = True


# torch imports this module (C++ set_python_module) when it needs the fake implementation of an op that was
# loaded without it.
if op_loaded():
    register_python()
