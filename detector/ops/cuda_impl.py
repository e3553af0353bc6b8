"""The CUDA kernel of ``torch.ops.sdetr.ms_deform_attn`` (registered by `registrations`): input checks, then
the Triton kernels (`triton_msda`, the default) or, opted into, the CUDA C++ kernels of ``csrc/cuda``.

Environment:
    SDETR_MSDA_CUDA_IMPL   ``triton`` (default) or ``cpp``: the CUDA C++ kernels, which exist only in a
                           build made with ``SDETR_MSDA_CUDA=1`` (they are registered as the separate ops
                           ``sdetr::ms_deform_attn_cuda_cpp`` / ``ms_deform_attn_backward_cuda_cpp``).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import Tensor

from sdetr.detector.ops.triton_util import triton_available

CUDA_IMPL_ENV = "SDETR_MSDA_CUDA_IMPL"
_IMPLS = ("triton", "cpp")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def alert_not_deterministic(op: str) -> None:
    """torch's rule for an op without a deterministic implementation: under
    ``torch.use_deterministic_algorithms(True)`` a RuntimeError, with ``warn_only=True`` a warning.

    (torch has no public Python hook for this; the check is the one its own CUDA kernels make.)
    """
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (
        f"{op} does not have a deterministic implementation (gradients are summed with atomic adds), "
        "but 'torch.use_deterministic_algorithms(True)' is set; pass warn_only=True to allow it"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(msg)


def cpp_cuda_kernels() -> bool:
    """Whether the loaded C++ library has the (opt-in) CUDA C++ kernels."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("sdetr::ms_deform_attn_cuda_cpp", "CUDA"))
    except RuntimeError:
        return False


def cuda_impl() -> str:
    """``triton`` or ``cpp``: which kernels serve CUDA tensors now (the env var, else what is available)."""
    want = os.environ.get(CUDA_IMPL_ENV, "").strip().lower()
    if want and want not in _IMPLS:
        raise ValueError(f"{CUDA_IMPL_ENV}={want!r}: expected one of {', '.join(_IMPLS)}")
    if want == "cpp" or (not want and not triton_available() and cpp_cuda_kernels()):
        if not cpp_cuda_kernels():
            raise RuntimeError(
                f"{CUDA_IMPL_ENV}=cpp, but the CUDA C++ kernels are not built: rebuild with "
                "`SDETR_MSDA_CUDA=1 sdetr doctor --build` (needs nvcc matching torch.version.cuda)"
            )
        return "cpp"
    return "triton"


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """The checks of ``csrc/ms_deform_attn.cpp`` (same messages), for the Python-registered CUDA kernel.

    Unlike the CPU kernel, the level tables are not checked against S: that would need a device sync.
    """
    torch._check(value.dim() == 4, lambda: f"ms_deform_attn: value must be [N, S, M, D], got {value.shape}")
    torch._check(
        sampling_locations.dim() == 6 and sampling_locations.shape[5] == 2,
        lambda: (
            f"ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got {sampling_locations.shape}"
        ),
    )
    torch._check(
        attention_weights.shape == sampling_locations.shape[:5],
        lambda: (
            f"ms_deform_attn: attention_weights {attention_weights.shape} must be "
            f"sampling_locations.shape[:-1] = {sampling_locations.shape[:5]}"
        ),
    )
    n, _, m, _ = value.shape
    torch._check(
        sampling_locations.shape[0] == n and sampling_locations.shape[2] == m,
        lambda: (
            f"ms_deform_attn: sampling_locations {sampling_locations.shape} does not match value "
            f"{value.shape} in N or M"
        ),
    )
    n_levels = sampling_locations.shape[3]
    torch._check(
        spatial_shapes.shape == (n_levels, 2) and level_start_index.shape == (n_levels,),
        lambda: (
            "ms_deform_attn: spatial_shapes must be [L, 2] and level_start_index [L] with "
            f"L = {n_levels}, got {spatial_shapes.shape} and {level_start_index.shape}"
        ),
    )
    torch._check(
        not spatial_shapes.is_floating_point() and not level_start_index.is_floating_point(),
        lambda: "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors",
    )
    torch._check(
        all(t.dtype in _FLOAT for t in (value, sampling_locations, attention_weights)),
        lambda: (
            "ms_deform_attn: value, sampling_locations and attention_weights must be float16, bfloat16, "
            f"float32 or float64; got {value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        ),
    )
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        torch._check(
            t.device == value.device,
            lambda name=name, t=t: (
                f"ms_deform_attn (CUDA kernel): {name} must be on the CUDA device "
                f"of value ({value.device}), got {t.device}"
            ),
        )


def _on_device(value: Tensor):
    """Launch on value's GPU (CPU tensors: Triton's interpreter, in tests)."""
    return torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext()


def forward_cuda(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if cuda_impl() == "cpp":
        return torch.ops.sdetr.ms_deform_attn_cuda_cpp(*args)
    # Imported here: Triton's import is slow and only CUDA calls need it.
    from sdetr.detector.ops import triton_msda

    with _on_device(value):
        return triton_msda.ms_deform_attn_forward(*args)


def backward_cuda(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    torch._check(
        grad_output.numel() == n * lq * m * d and grad_output.device == value.device,
        lambda: (
            "ms_deform_attn_backward: grad_output must have N * Lq * M * D elements on value's device, "
            f"got {grad_output.shape} on {grad_output.device}"
        ),
    )
    args = (grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if cuda_impl() == "cpp":
        return torch.ops.sdetr.ms_deform_attn_backward_cuda_cpp(*args)
    from sdetr.detector.ops import triton_msda

    # grad_value is summed with atomics, in an order that varies between runs.
    alert_not_deterministic("sdetr::ms_deform_attn_backward (CUDA, Triton)")
    with _on_device(value):
        return triton_msda.ms_deform_attn_backward(*args)
