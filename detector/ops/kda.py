"""What torch needs around the compiled key-aware deformable attention op (``csrc/kda.cpp``): autograd, the
fake (meta) implementations, FLOP formulas, the GPU implementation (a Triton kernel, registered for the CUDA
dispatch key). The per-call choice between the op and the pure-PyTorch reference: `backend.use_compiled_kda`.

The C++ library names this module (``set_python_module``): torch imports it when it needs the fake
implementation of an op that was loaded without it.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_registered = False


def kda_op_loaded() -> bool:
    try:
        torch.ops.sdetr.kda  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------- FLOPs
def kda_flops(query_shape, sampling_locations_shape, separate_key: bool = False) -> int:
    """FLOPs of one forward call in the papers' (fvcore) convention.

    Bilinear sampling 4 per sampled value (``grid_sample``'s count), once per point when keys are the
    values (one sample serves both), twice with separate keys; the query-key products and the weighted
    sum of the values, one multiply-add each per channel and point (matrix products, 1 per multiply-add).
    fvcore run on the released pure-PyTorch code, which samples the keys separately even when they are the
    values, would count another 4 per value in that case.

    Args:
        query_shape: [N, Lq, M, D]; sampling_locations_shape: [N, Lq, M, L, P, 2].
    """
    n, lq, m, d = (int(x) for x in query_shape)
    _, _, _, n_levels, n_points, _ = (int(x) for x in sampling_locations_shape)
    per_point = (8 if separate_key else 4) + 2
    return per_point * n * lq * m * d * n_levels * n_points


def _flop_forward(query_shape, value_shape, key_shape, ss_shape, lsi_shape, loc_shape, **kwargs) -> int:
    # FlopCounterMode counts 2 per multiply-add; the cost model halves everything it counts.
    return 2 * kda_flops(query_shape, loc_shape, separate_key=key_shape is not None)


def _flop_backward(grad_shape, gw_shape, query_shape, value_shape, key_shape, *rest, **kwargs) -> int:
    loc_shape = rest[2]
    return 4 * kda_flops(query_shape, loc_shape, separate_key=key_shape is not None)


# ------------------------------------------------------------------------------------------ fake / autograd
def _fake_forward(query, value, key, spatial_shapes, level_start_index, sampling_locations):
    torch._check(query.dim() == 4, lambda: f"query must be [N, Lq, M, D], got {tuple(query.shape)}")
    torch._check(value.dim() == 4, lambda: f"value must be [N, S, M, D], got {tuple(value.shape)}")
    torch._check(
        sampling_locations.dim() == 6,
        lambda: f"sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}",
    )
    n, lq, m, d = query.shape
    out = value.new_empty((n, lq, m * d))
    return out, value.new_empty(sampling_locations.shape[:5])


def _fake_backward(grad_output, grad_w, query, value, key, spatial_shapes, level_start_index, loc, attn):
    grad_key = value.new_empty(key.shape) if key is not None else value.new_empty((0,))
    return (
        query.new_empty(query.shape),
        value.new_empty(value.shape),
        grad_key,
        loc.new_empty(loc.shape),
    )


def _setup_context(ctx, inputs, output):
    query, value, key, spatial_shapes, level_start_index, loc = inputs
    ctx.has_key = key is not None
    ctx.save_for_backward(query, value, key, spatial_shapes, level_start_index, loc, output[1])


def _backward(ctx, grad_output, grad_weights):
    query, value, key, spatial_shapes, level_start_index, loc, weights = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros((*query.shape[:2], query.shape[2] * query.shape[3]), dtype=query.dtype)
    grad_q, grad_v, grad_k, grad_loc = torch.ops.sdetr.kda_backward(
        grad_output, grad_weights, query, value, key, spatial_shapes, level_start_index, loc, weights
    )
    need = ctx.needs_input_grad
    return (
        grad_q if need[0] else None,
        grad_v if need[1] else None,
        grad_k if ctx.has_key and need[2] else None,
        None,
        None,
        grad_loc if need[5] else None,
    )


def _cuda_forward(query, value, key, spatial_shapes, level_start_index, sampling_locations):
    from sdetr.detector.ops import triton_kda  # triton: optional, imported only on the GPU path

    return triton_kda.kda_forward(query, value, key, spatial_shapes, level_start_index, sampling_locations)


def _cuda_backward(grad_output, grad_w, query, value, key, spatial_shapes, level_start_index, loc, attn):
    from sdetr.detector.ops import triton_kda  # triton: optional, imported only on the GPU path
    from sdetr.detector.ops.cuda_impl import alert_not_deterministic

    # The value, key and location gradients are summed with atomics, in an order that varies between runs.
    alert_not_deterministic("sdetr::kda_backward (CUDA, Triton)")

    return triton_kda.kda_backward(
        grad_output, grad_w, query, value, key, spatial_shapes, level_start_index, loc, attn
    )


def register_kda() -> None:
    """Register the Python side of ``sdetr::kda`` once the library is loaded (no-op before)."""
    global _registered
    with _lock:
        if _registered or not kda_op_loaded():
            return
        from torch.utils.flop_counter import register_flop_formula

        torch.library.register_fake("sdetr::kda")(_fake_forward)
        torch.library.register_fake("sdetr::kda_backward")(_fake_backward)
        torch.library.register_autograd("sdetr::kda", _backward, setup_context=_setup_context)
        torch.library.impl("sdetr::kda", "CUDA")(_cuda_forward)
        torch.library.impl("sdetr::kda_backward", "CUDA")(_cuda_backward)
        register_flop_formula(torch.ops.sdetr.kda)(_flop_forward)
        register_flop_formula(torch.ops.sdetr.kda_backward)(_flop_backward)
        _registered = True


# torch imports this module (C++ set_python_module) when it needs the fake implementation of an op loaded
# without it.
if kda_op_loaded():
    register_kda()
