"""What torch needs around the compiled kernels: autograd, fake (meta) implementations for
``torch.compile``/``FakeTensorMode``, and FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``.

The C++ library names this module (``set_python_module``): torch imports it when it needs the fake
implementation of an op that was loaded without it.
"""

from __future__ import annotations

import threading

import torch

from sdetr.detector.ops.flops import ms_deform_attn_flop_counter_flops
from sdetr.detector.ops.kda import register_kda

_lock = threading.Lock()
_python_registered = False


def op_loaded() -> bool:
    try:
        torch.ops.sdetr.ms_deform_attn  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


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
        register_kda()
        _python_registered = True


# torch imports this module (C++ set_python_module) when it needs the fake implementation of an op that was
# loaded without it.
if op_loaded():
    register_python()
